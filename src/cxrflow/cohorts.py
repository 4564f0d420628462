"""Cohorts: for one pathology, its positives against the shared "no pathology" pool, filtered as in the paper.

Filters run in a fixed order (view, sex, age, QC, quality tag, duplicates, exclusions, uncertain exclusions, class
definition, the negatives' rules, balancing, cap) and each one records how many images and patients it removed and
why: the CONSORT-style flow of the cohort.

Which keys a source labels: a key counts as labelled when its catalog column holds at least one non-missing value
(in the catalog given, before any filter). A key the source never labels (NIH has no "pneumosclerosis": the column
is all missing) neither makes an image uncertain nor counts as a finding; a missing value on a labelled key is
"uncertain or not assessed".

The negative class (`cohorts.negatives`):
  normal      (default) the source affirms a normal study (key `normal` == 1), no labelled key is 1 or missing,
              and the image carries no dataset quality tag (catalog column `quality_tag` == 1, e.g. PadChest
              'exclude' or 'suboptimal study'; tagged images leave both classes, in the step "quality tag").
  unlabelled  the older, weaker rule: no key is 1 and the target is 0. Images with an uncertain finding, an
              unlabelled state or nothing affirmed at all become negatives; in PadChest's six cohorts about one
              negative in ten is then not a normal study (tests/test_negatives.py prints the figures).
With `cohorts.uncertain_exclusions: remove` (default) an image with a missing value on a labelled exclusion key
leaves both classes (step "exclusions: uncertain"); `keep` keeps it, as before.

The filters narrow an array of row positions instead of copying ever smaller DataFrames, and the first six
(view, sex, age, QC, quality tag, duplicates) do not depend on the pathology, so `build_cohorts` runs them once for
several cohorts.
A 2,000,000-row catalog takes seconds for all nine (benchmarks/cohorts.py).
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxrflow.errors import CxrflowError
from cxrflow_plan import enabled_pathologies  # noqa: F401  (Snakemake plans the cohorts with it)

FLOW_COLUMNS = ["step", "images", "patients", "positives", "negatives", "removed_images", "removed_patients", "reason"]
# The catalog columns a cohort reads besides the label keys; the pipeline loads only these.
COHORT_COLUMNS = ["image_id", "patient_id", "sex", "age", "view"]
NORMAL_KEY = "normal"  # the source's own affirmation of a normal study (config/labels/keys.yaml)
QUALITY_TAG = "quality_tag"  # optional catalog column: 1 = the dataset tags the image to leave out
OPTIONAL_COLUMNS = [QUALITY_TAG]  # read when the catalog has them


def cohort_seed(seed: int, pathology: str) -> int:
    """One seed per cohort, so that changing one cohort's config leaves every other cohort unchanged."""
    return (seed * 1_000_003 + zlib.crc32(pathology.encode())) % (2**32)


def exclusion_keys(cohorts_cfg: dict, pathology: str) -> list[str]:
    entry = cohorts_cfg["pathologies"][pathology]
    keys = (set(cohorts_cfg.get("exclusions", [])) | set(entry.get("exclude_add", []))) - set(entry.get("exclude_remove", []))
    return sorted(keys - set(entry["positive"]))  # a cohort's own target is never an exclusion


def build_cohort(catalog: pd.DataFrame, quality: pd.DataFrame | None, cohorts_cfg: dict, pathology: str,
                 keys: list[str], seed: int, *, duplicates: pd.DataFrame | None = None,
                 with_pool: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (cohort, flow): cohort rows are image_id, patient_id, label (sorted by image_id); flow has one
    row per filter with the images and patients left, what it removed, and why.

    `duplicates` (image_id, group), when given, keeps one image per duplicate group (the first by image_id) in the
    step "duplicates" (`split.duplicates: drop`). With `with_pool`, the cohort also holds the eligible images that
    balancing and the cap left out, and a bool column `selected` marks the cohort proper: a natural-prevalence
    test split (`split.test_prevalence: natural`) draws on them.

    Raises CxrflowError for an unknown pathology or key, when the source never labels the cohort's target
    (every value missing), since such a cohort can have neither positives nor negatives, and with
    `negatives: normal` when the source never affirms a normal study.
    """
    return build_cohorts(catalog, quality, cohorts_cfg, [pathology], keys, seed, duplicates=duplicates,
                         with_pool=with_pool)[pathology]


def build_cohorts(catalog: pd.DataFrame, quality: pd.DataFrame | None, cohorts_cfg: dict, pathologies: list[str],
                  keys: list[str], seed: int, *, duplicates: pd.DataFrame | None = None,
                  with_pool: bool = False) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """`build_cohort` for several pathologies at once, running the filters they share only once.
    Each result is identical to what `build_cohort` gives for that pathology alone."""
    for pathology in pathologies:
        _check_entry(catalog, cohorts_cfg, pathology, keys)
    catalog_rows = _Rows(catalog, keys)
    shared = _shared_filters(catalog_rows, quality, cohorts_cfg, duplicates)
    return {p: _finish(shared, cohorts_cfg, p, seed, with_pool) for p in pathologies}


def negative_rule(cohorts_cfg: dict) -> str:
    return cohorts_cfg.get("negatives", "normal")


def labelled_keys(catalog: pd.DataFrame, keys: list[str]) -> list[str]:
    """The keys the source labels: those whose catalog column holds at least one non-missing value."""
    return [k for k in keys if catalog[k].notna().any()]


def _check_entry(catalog: pd.DataFrame, cohorts_cfg: dict, pathology: str, keys: list[str]) -> None:
    if pathology not in cohorts_cfg["pathologies"]:
        raise CxrflowError(f"cohorts.pathologies: no entry {pathology!r}; configured: {sorted(cohorts_cfg['pathologies'])}")
    targets = cohorts_cfg["pathologies"][pathology]["positive"]
    unknown = sorted((set(targets) | set(exclusion_keys(cohorts_cfg, pathology))) - set(keys))
    if unknown:
        raise CxrflowError(f"cohorts.pathologies.{pathology}: unknown label key(s) {unknown}")
    missing = [c for c in COHORT_COLUMNS + list(keys) if c not in catalog.columns]
    if missing:
        raise CxrflowError(f"catalog: missing column(s) {missing} needed by cohort {pathology!r}")
    if not any(catalog[k].notna().any() for k in targets):
        raise CxrflowError(
            f"cohorts.pathologies.{pathology}: the source never labels {targets} (every catalog value is missing), "
            f"so this cohort can have neither positives nor negatives; leave it out with cohorts.enabled "
            f"(config/padchest.yaml shows how)")
    if negative_rule(cohorts_cfg) == "normal":
        if NORMAL_KEY not in keys or NORMAL_KEY not in catalog.columns:
            raise CxrflowError(f"cohorts.negatives: normal needs the label key {NORMAL_KEY!r} (config/labels/keys.yaml) "
                               f"and its catalog column; use cohorts.negatives: unlabelled for the older rule")
        if not catalog[NORMAL_KEY].eq(1).any():
            raise CxrflowError(
                f"cohorts.negatives: normal, but the source never affirms a normal study (no catalog value of "
                f"{NORMAL_KEY!r} is 1), so cohort {pathology!r} can have no negatives; map the source's normal label "
                f"(e.g. NIH 'No Finding') or its vocabulary's normal phrases to {NORMAL_KEY!r}, or set "
                f"cohorts.negatives: unlabelled (weaker: negatives need not be normal studies)")


class _Rows:
    """A selection of catalog rows (positions), with what the flow needs to count its images and patients."""

    def __init__(self, catalog: pd.DataFrame, keys: list[str]):
        self.catalog = catalog
        self.keys = list(keys)
        self.patient_codes = pd.factorize(catalog["patient_id"])[0]
        self.n_patients = int(self.patient_codes.max()) + 1 if len(catalog) else 0
        self.labelled = labelled_keys(catalog, self.keys)  # on the whole catalog, before any filter
        self.rows = np.arange(len(catalog))
        self.label: np.ndarray | None = None
        self.key_cache: dict[str, np.ndarray] = {}
        self.flow: list[dict] = []
        self.record("catalog", "")

    def copy(self) -> _Rows:
        twin = copy.copy(self)  # shares the catalog, the patient codes and the key cache
        twin.flow = list(self.flow)
        return twin

    def column(self, name: str) -> pd.Series:
        return self.catalog[name].iloc[self.rows]

    def key_values(self, names: list[str]) -> np.ndarray:
        """The labels of the given keys at the current rows, one row per key: 1 present, 0 absent, -1 missing."""
        out = np.empty((len(names), len(self.rows)), dtype=np.int8)
        for i, name in enumerate(names):
            if name not in self.key_cache:
                self.key_cache[name] = self.catalog[name].to_numpy(dtype=np.int8, na_value=-1)
            out[i] = self.key_cache[name][self.rows]
        return out

    def record(self, step: str, reason: str) -> None:
        patients = int(np.count_nonzero(np.bincount(self.patient_codes[self.rows], minlength=self.n_patients)))
        previous = self.flow[-1] if self.flow else None
        self.flow.append({
            "step": step,
            "images": len(self.rows),
            "patients": patients,
            "positives": int((self.label == 1).sum()) if self.label is not None else pd.NA,
            "negatives": int((self.label == 0).sum()) if self.label is not None else pd.NA,
            "removed_images": 0 if previous is None else previous["images"] - len(self.rows),
            "removed_patients": 0 if previous is None else previous["patients"] - patients,
            "reason": reason,
        })

    def keep(self, mask: np.ndarray, step: str, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.rows = self.rows[mask]
        if self.label is not None:
            self.label = self.label[mask]
        self.record(step, reason)


def _shared_filters(rows: _Rows, quality: pd.DataFrame | None, cohorts_cfg: dict,
                    duplicates: pd.DataFrame | None) -> _Rows:
    """The filters that do not depend on the pathology, in their fixed order. A filter set to null is off."""
    filters = cohorts_cfg.get("filters", {})
    for step, keep, reason in metadata_filters(rows.catalog, filters):
        rows.keep(keep[rows.rows], step, reason)
    if filters.get("require_qc_pass", True) and quality is not None:
        rows.keep(_passed_qc(rows.column("image_id"), quality), "quality", "failed quality control or could not be decoded")
    if negative_rule(cohorts_cfg) == "normal" and QUALITY_TAG in rows.catalog.columns:
        tagged = rows.column(QUALITY_TAG).eq(1).to_numpy(dtype=bool, na_value=False)
        rows.keep(~tagged, "quality tag", "the source tags the image to leave out (e.g. PadChest 'exclude', 'suboptimal study')")
    if duplicates is not None:
        rows.keep(_first_of_each_duplicate_group(rows.column("image_id"), duplicates), "duplicates",
                  "a copy of another image (same duplicate group); the first by image_id is kept")
    return rows


def metadata_filters(images: pd.DataFrame, filters: dict) -> list[tuple[str, np.ndarray, str]]:
    """The filters that need neither labels nor pixels, in their order: (step, which images pass, reason). A filter
    set to null is off. The cohorts apply them, and so does the pixel branch's pre-filter (`prefilter`), so that
    only images some cohort can take are decoded."""
    steps = []
    if filters.get("views"):
        steps.append(("view", _isin(images["view"], filters["views"]), f"view not in {filters['views']}"))
    if filters.get("sex"):
        steps.append(("sex", images["sex"].eq(filters["sex"]).to_numpy(dtype=bool, na_value=False),
                      f"sex is not {filters['sex']} (or unknown)"))
    if filters.get("age"):
        lo, hi = filters["age"]
        steps.append(("age", images["age"].between(lo, hi).to_numpy(dtype=bool, na_value=False),
                      f"age outside [{lo}, {hi}] (or unknown)"))
    return steps


def prefilter(images: pd.DataFrame, filters: dict) -> pd.DataFrame:
    """For each image (view, sex, age) the first metadata filter it fails, as the ledger names it: `reason`
    ("<step>_filter", missing for a candidate) and `detail`. `filters` is the union of what every consumer of
    the pixels needs (workflow/rules/common.smk, candidate_filters)."""
    reason = np.full(len(images), None, dtype=object)
    detail = np.full(len(images), None, dtype=object)
    for step, keep, why in metadata_filters(images, filters):
        first = ~keep & (reason == None)  # noqa: E711  (elementwise on an object array)
        reason[first], detail[first] = f"{step}_filter", why
    return pd.DataFrame({"reason": pd.array(reason, dtype="string"), "detail": pd.array(detail, dtype="string")},
                        index=images.index)


def _finish(shared: _Rows, cohorts_cfg: dict, pathology: str, seed: int,
            with_pool: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pathology's own steps: exclusions, class definition, the negatives' rules, balancing, cap."""
    rows = shared.copy()
    targets = list(cohorts_cfg["pathologies"][pathology]["positive"])
    excluded = exclusion_keys(cohorts_cfg, pathology)
    if excluded:
        rows.keep(~(rows.key_values(excluded) == 1).any(axis=0), "exclusions", "carries an exclusion finding")
    labelled_excluded = [k for k in excluded if k in rows.labelled]
    if labelled_excluded and cohorts_cfg.get("uncertain_exclusions", "remove") == "remove":
        rows.keep(~(rows.key_values(labelled_excluded) == -1).any(axis=0), "exclusions: uncertain",
                  "an exclusion finding is uncertain or not assessed (missing)")

    findings = [k for k in rows.keys if k != NORMAL_KEY]  # `normal` == 1 is no finding
    target_values = rows.key_values(targets)
    positive = (target_values == 1).any(axis=0)
    # A negative has no finding at all, and its target is known to be absent (not uncertain, not unlabelled).
    no_pathology = ~(rows.key_values(findings) == 1).any(axis=0) & (target_values == 0).all(axis=0)
    rows.rows = rows.rows[positive | no_pathology]
    rows.label = positive[positive | no_pathology].astype(np.int8)
    rows.record("class", "other findings, or the target is uncertain or unlabelled")

    if negative_rule(cohorts_cfg) == "normal":
        negative = rows.label == 0
        labelled_findings = [k for k in findings if k in rows.labelled]
        uncertain = (rows.key_values(labelled_findings) == -1).any(axis=0)
        rows.keep(~(negative & uncertain), "negatives: a finding uncertain",
                  "negative with a finding the source labels uncertain or not assessed (missing)")
        negative = rows.label == 0
        affirmed = rows.key_values([NORMAL_KEY])[0] == 1
        rows.keep(~(negative & ~affirmed), "negatives: not affirmed normal",
                  f"negative the source does not affirm as a normal study ({NORMAL_KEY!r} is not 1)")

    pool = _cohort_frame(rows)
    if cohorts_cfg.get("balance", "undersample") == "undersample":
        n = int(np.bincount(rows.label, minlength=2).min())
        reason = "undersampled to balance the classes" if n else "a class is empty, so no balanced cohort exists"
        rows.keep(_sample_per_class(rows.column("image_id"), rows.label, n, seed), "balance", reason)
    cap = cohorts_cfg.get("max_per_class")
    if cap:
        rows.keep(_sample_per_class(rows.column("image_id"), rows.label, cap, seed), "cap", f"more than {cap} images in the class")

    cohort = _cohort_frame(rows)
    if with_pool:
        cohort = pool.assign(selected=pool["image_id"].isin(cohort["image_id"]).to_numpy(dtype=bool))
    return cohort, pd.DataFrame(rows.flow, columns=FLOW_COLUMNS)


def _cohort_frame(rows: _Rows) -> pd.DataFrame:
    cohort = pd.DataFrame({
        "image_id": rows.column("image_id").to_numpy(),
        "patient_id": rows.column("patient_id").to_numpy(),
        "label": rows.label,
    })
    return cohort.sort_values("image_id", kind="stable").reset_index(drop=True)


def _first_of_each_duplicate_group(image_ids: pd.Series, duplicates: pd.DataFrame) -> np.ndarray:
    """A mask keeping every image that is in no duplicate group, and the first (by image_id) of each group's
    images that are still there."""
    table = duplicates.drop_duplicates("image_id")
    group_of = pd.Series(table["group"].astype("string").to_numpy(), index=table["image_id"].astype("string").to_numpy())
    frame = pd.DataFrame({"image_id": image_ids.astype("string").to_numpy()})
    frame["group"] = frame["image_id"].map(group_of)
    grouped = frame[frame["group"].notna()].sort_values(["group", "image_id"], kind="stable")
    keep = np.ones(len(frame), dtype=bool)
    keep[grouped.index[grouped["group"].duplicated()].to_numpy()] = False
    return keep


def _isin(values: pd.Series, allowed) -> np.ndarray:
    """values.isin(allowed) as a bool array; missing values never match. Arrow does the hashing: pandas' isin on
    Arrow strings walks `allowed` in Python, which takes seconds for a million quality-control rows."""
    found = pc.is_in(_arrow_strings(values), value_set=_arrow_strings(allowed))
    return found.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def _passed_qc(image_ids: pd.Series, quality: pd.DataFrame) -> np.ndarray:
    """For each image, whether the quality table lists it as passed (an image it does not list has not passed).
    The remaining rows, usually far fewer than the quality table's, make the hash set: two or three times faster."""
    ids, listed = _arrow_strings(image_ids), _arrow_strings(quality["image_id"])
    relevant = pc.is_in(listed, value_set=ids).to_numpy(zero_copy_only=False)
    passed = relevant & quality["qc_pass"].to_numpy(dtype=bool, na_value=False)
    found = pc.is_in(ids, value_set=listed.filter(pa.array(passed)))
    return found.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def _arrow_strings(values) -> pa.Array:
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
    return pa.array(series, from_pandas=True).cast(pa.large_string())


def _sample_per_class(image_ids: pd.Series, label: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A mask keeping at most n images of each class: those first in one seeded random order of the image ids.

    The order is the same for every cohort (it depends on the seed and the image id only, not on the pathology or
    the catalog's row order), so the cohorts' draws nest: the negatives of a cohort with few positives are a subset
    of those of a cohort with more, drawn from the same normal pool. The binary models then share their negatives,
    and a multi-label network trained on the union of the cohorts reads the largest cohort's negatives once
    instead of every cohort's own draw. Changing one cohort's config still leaves every other cohort unchanged.
    """
    ids = image_ids.astype(str).reset_index(drop=True)
    rank = pd.util.hash_pandas_object(ids, index=False, hash_key=f"cxrflow{seed % 10**9:09d}").to_numpy()
    keep = np.zeros(len(label), dtype=bool)
    for cls in (0, 1):
        members = np.flatnonzero(label == cls)
        if len(members) <= n:
            keep[members] = True
            continue
        members = members[ids.iloc[members].argsort(kind="stable").to_numpy()]  # ties (none in practice) by id
        keep[members[np.argsort(rank[members], kind="stable")[:n]]] = True
    return keep
