"""Multi-label mode: one network with one output per enabled pathology, trained once on the union of the cohorts.

The paper trains one binary network per finding; most of that compute reads the same normal images again for every
finding. Here one network has an output k per enabled pathology (and optionally auxiliary outputs for other label
keys), and three things keep it comparable with the nine binary models, row by row:

1. One patient-level split shared by every cohort (`shared_split`): a patient (or a unit of patients linked by
   duplicate images) is in the same group in every cohort, so that no test patient of any cohort trains the
   network. Cohorts are split one after the other by `cxrflow.splits.patient_exclusive_split`, the rarest first
   (fewest positive units); units that an earlier cohort placed keep their group, and the free units fill each
   group's remaining share, stratified and seeded as in the binary split. The binary models may train on the same
   manifests, so both modes are tested on exactly the same images. `split.test_prevalence: natural` adds each
   cohort's left-out eligible images of shared test units, and of one share of the units in no cohort at all.
2. The training table (`training_table`): the union of the cohorts' train and val images, one row per image, with a
   label matrix: column k is 1 or 0 where the image is a positive or negative of cohort k, and missing (NaN) where
   the image is not in cohort k. Auxiliary columns (`aux:<key>`) carry catalog label keys, optionally also on
   catalog images outside every cohort, never on an image of a patient in any test or val split.
3. The loss (`masked_bce`): BCE per output, counted only where the label is defined, each output with its own class
   weights (`output_weights`, `cxrflow.train.sample_weights` applied per column).

Importing this module pulls in neither MONAI nor the image decoders (benchmarks/gpu_train.py --mode multilabel).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cxrflow.cohorts import cohort_seed
from cxrflow.errors import CxrflowError
from cxrflow.inference import predict_cached, use_threads
from cxrflow.splits import draw_test_units, patient_exclusive_split, split_groups, split_units
from cxrflow.train import Task, TrainResult, config_hash, finish, fit, output_aucs, run_metadata, sample_weights

if TYPE_CHECKING:
    from cxrflow.tensors import TensorCache

AUX_PREFIX = "aux:"


# --- 1. one split for every cohort ---------------------------------------------------------------------------------

def shared_split(cohorts: dict[str, pd.DataFrame], settings: dict, seed: int,
                 duplicates: pd.DataFrame | None = None, stats: dict | None = None) -> dict[str, pd.DataFrame]:
    """The manifests of all cohorts (same columns as patient_exclusive_split's), from one patient-level assignment.

    `cohorts`: pathology -> cohort rows (image_id, patient_id, label[, selected]). When the units that earlier
    cohorts placed leave a later cohort without `min_patients_per_class` units of a class in a group (small cohorts
    drawing their negatives from one pool), units move between groups where no cohort they belong to falls short
    (`stats["moved_units"]` counts them). Raises CxrflowError when an image has two patient ids in two cohorts, or
    when no such move exists.
    """
    natural = settings.get("test_prevalence", "balanced") == "natural"
    settings = {**settings, "test_prevalence": "balanced"}  # the natural test rows come last, from the shared groups
    union = pd.concat([c[["image_id", "patient_id"]] for c in cohorts.values()], ignore_index=True).drop_duplicates()
    union["image_id"] = union["image_id"].astype(str)
    clash = union["image_id"].duplicated(keep=False)
    if clash.any():
        raise CxrflowError(f"cohorts: image {union.loc[clash, 'image_id'].iloc[0]!r} has different patient ids in "
                           "different cohorts")
    union = union.sort_values("image_id", kind="stable").reset_index(drop=True)
    unit_of = pd.Series(split_units(union, duplicates), index=union["image_id"].to_numpy())
    names, folds, _ = split_groups(settings)

    def positive_units(pathology):
        frame = cohorts[pathology]
        chosen = frame["selected"].to_numpy(dtype=bool) if "selected" in frame.columns else np.ones(len(frame), bool)
        return unit_of[frame.loc[chosen & (frame["label"] == 1).to_numpy(), "image_id"].astype(str)].nunique()

    assigned: dict = {}
    manifests = {}
    for pathology in sorted(cohorts, key=lambda p: (positive_units(p), p)):
        frame = cohorts[pathology].assign(unit=lambda f: unit_of[f["image_id"].astype(str)].to_numpy())
        try:
            manifest = patient_exclusive_split(frame, settings, seed, pathology, assigned=assigned)
        except CxrflowError as err:
            if "shared with the other cohorts" not in str(err):
                raise
            # The units other cohorts placed leave a group without a class; `_repair` moves some below.
            manifest = patient_exclusive_split(frame, {**settings, "min_patients_per_class": 0}, seed, pathology,
                                               assigned=assigned)
        group = _group_index(manifest, names, folds)
        units = unit_of[manifest["image_id"].astype(str)].to_numpy()
        for unit, g in zip(units, group):
            assigned.setdefault(unit, int(g))
        manifests[pathology] = manifest
    members = {p: pd.DataFrame({"unit": unit_of[m["image_id"].astype(str)].to_numpy(), "label": m["label"].to_numpy()})
               for p, m in manifests.items()}
    moved = _repair(assigned, members, len(names), int(settings.get("min_patients_per_class", 1)))
    for pathology, manifest in manifests.items():
        group = np.array([assigned[u] for u in members[pathology]["unit"]], dtype=int)
        manifest["split"] = np.array(names, dtype=object)[group]
        if "fold" in manifest.columns:
            fold = np.array([-1 if f is None else f for f in folds])[group]
            manifest["fold"] = pd.array(np.where(fold < 0, None, fold), dtype="Int8")
    if natural:
        _add_natural_test_rows(manifests, cohorts, unit_of, assigned, names.index("test"), settings, seed)
    if stats is not None:
        stats["moved_units"] = moved
    return {p: manifests[p] for p in sorted(manifests)}


def _add_natural_test_rows(manifests: dict, cohorts: dict, unit_of: pd.Series, assigned: dict, test_group: int,
                           settings: dict, seed: int) -> None:
    """`split.test_prevalence: natural` for the shared split (cxrflow.splits explains the binary one): each cohort's
    test split gains its eligible images outside the balanced cohort (`selected` false) of units in the shared test
    group, and of one `split.test` share of the units that are in no cohort proper at all, drawn once for every
    cohort. No such image belongs to a unit that trains or validates in any cohort, so the network never sees a
    test image of any cohort."""
    left = {p: c.loc[~c["selected"].to_numpy(dtype=bool), ["image_id", "patient_id", "label"]]
            .assign(unit=lambda f: unit_of[f["image_id"].astype(str)].to_numpy())
            for p, c in cohorts.items() if "selected" in c.columns}
    outside = pd.concat(left.values(), ignore_index=True) if left else pd.DataFrame(columns=["image_id", "unit", "label"])
    outside = outside[~outside["unit"].isin(assigned.keys())]
    outside = outside.sort_values(["image_id", "label"], ascending=[True, False], kind="stable").drop_duplicates("image_id")
    drawn = draw_test_units(outside, settings.get("test", 0.25), np.random.default_rng([cohort_seed(seed, "shared"), 1]))
    test_units = {u for u, g in assigned.items() if g == test_group} | drawn
    for pathology, rows in left.items():
        extra = rows.loc[rows["unit"].isin(test_units), ["image_id", "patient_id", "label"]].assign(split="test")
        if "fold" in manifests[pathology].columns:
            extra["fold"] = pd.array([pd.NA] * len(extra), dtype="Int8")
        manifests[pathology] = (pd.concat([manifests[pathology], extra], ignore_index=True)
                                .sort_values("image_id", kind="stable").reset_index(drop=True))


def _repair(assigned: dict, members: dict[str, pd.DataFrame], n_groups: int, minimum: int) -> int:
    """Move units between groups until every cohort has `minimum` units of each class in every group; a unit moves
    only when no cohort it belongs to falls below the minimum where it leaves. Returns the number of moves; raises
    CxrflowError when a cohort cannot be covered."""
    def counts(frame):  # (group, class) -> units
        pairs = frame.drop_duplicates(["unit", "label"])
        table = np.zeros((n_groups, 2), dtype=int)
        np.add.at(table, (pairs["unit"].map(assigned).to_numpy(dtype=int), pairs["label"].to_numpy(dtype=int)), 1)
        return table

    moves = 0
    for _ in range(10 * n_groups * len(members) + 10):
        tables = {p: counts(f) for p, f in members.items()}
        lacking = [(p, g, c) for p, t in tables.items() for g in range(n_groups) for c in (0, 1) if t[g, c] < minimum]
        if not lacking:
            return moves
        pathology, group, cls = lacking[0]
        frame = members[pathology]
        candidates = sorted(set(frame.loc[frame["label"] == cls, "unit"]) - {u for u, g in assigned.items() if g == group},
                            key=lambda u: (-tables[pathology][assigned[u], cls], str(u)))
        for unit in candidates:
            source = assigned[unit]
            safe = all(tables[p][source, int(label)] > minimum
                       for p, f in members.items() for label in f.loc[f["unit"] == unit, "label"].unique())
            if safe:
                assigned[unit] = group
                moves += 1
                break
        else:
            raise CxrflowError(f"cohort {pathology!r}: no patient of class {cls} can move to split group {group} of the "
                               f"split shared by all cohorts without emptying another cohort's group; the cohorts are "
                               f"too small for one shared split")
    raise CxrflowError("shared split: the repair of the groups did not converge")


def _group_index(manifest: pd.DataFrame, names: list[str], folds: list) -> np.ndarray:
    """The group (split_groups' order) of each manifest row: test 0; then val, train, or with folds 1 + fold."""
    if "fold" in manifest.columns:
        return np.where(manifest["split"] == "test", 0, manifest["fold"].fillna(-1).astype(int).to_numpy() + 1)
    return manifest["split"].map({name: i for i, name in enumerate(names)}).to_numpy()


def split_conflicts(manifests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Patients that sit in more than one split across the manifests (empty for a shared split): patient_id and
    the splits and cohorts they appear in."""
    rows = pd.concat([m[["patient_id", "split"]].assign(pathology=p) for p, m in manifests.items()], ignore_index=True)
    per_patient = rows.groupby("patient_id").agg(splits=("split", lambda s: sorted(set(s))),
                                                 cohorts=("pathology", lambda s: sorted(set(s))))
    return per_patient[per_patient["splits"].map(len) > 1].reset_index()


# --- 2. the training table -----------------------------------------------------------------------------------------

def training_table(manifests: dict[str, pd.DataFrame], catalog: pd.DataFrame | None = None,
                   auxiliary_keys: list[str] = (), extra_images: pd.Series | None = None,
                   duplicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per train or val image of any cohort: image_id, patient_id, split, one float column per pathology
    (1, 0, NaN where the image is not in that cohort) and one `aux:<key>` column per auxiliary key (the catalog's
    1/0, NaN where missing).

    `extra_images` (image ids, e.g. every QC-passed catalog image) adds training rows for the auxiliary outputs:
    each such image outside the cohorts joins `train` unless its patient, or a patient linked to it by a duplicate
    image, is in any cohort's val or test split. Their pathology columns are NaN.
    """
    rows = []
    for pathology, manifest in manifests.items():
        part = manifest.loc[manifest["split"].isin(["train", "val"]), ["image_id", "patient_id", "split", "label"]]
        rows.append(part.assign(pathology=pathology))
    long = pd.concat(rows, ignore_index=True)
    long["image_id"] = long["image_id"].astype(str)
    splits = long.groupby("image_id")["split"].nunique()
    if (splits > 1).any():
        raise CxrflowError(f"image {splits[splits > 1].index[0]!r} is in train in one cohort and val in another: the "
                           "manifests do not come from one shared split (cxrflow.multilabel.shared_split)")
    table = long.pivot_table(index="image_id", columns="pathology", values="label", aggfunc="first")
    table = table.reindex(columns=list(manifests)).astype("float32")
    meta = long.drop_duplicates("image_id").set_index("image_id")[["patient_id", "split"]]
    table = meta.join(table).reset_index()
    table.columns.name = None
    if extra_images is not None and len(extra_images):
        table = pd.concat([table, _extra_rows(manifests, catalog, extra_images, set(table["image_id"]), duplicates)],
                          ignore_index=True)
    if auxiliary_keys:
        if catalog is None:
            raise CxrflowError("train.auxiliary_keys needs the catalog")
        missing = [k for k in auxiliary_keys if k not in catalog.columns]
        if missing:
            raise CxrflowError(f"train.auxiliary_keys: {missing} are not catalog label columns")
        labels = catalog.assign(image_id=catalog["image_id"].astype(str)).set_index("image_id")[list(auxiliary_keys)]
        aux = labels.reindex(table["image_id"]).astype("float32").to_numpy()
        for j, key in enumerate(auxiliary_keys):
            table[AUX_PREFIX + key] = aux[:, j]
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)


def _extra_rows(manifests, catalog, extra_images, taken: set, duplicates) -> pd.DataFrame:
    if catalog is None:
        raise CxrflowError("train.auxiliary_images: catalog needs the catalog")
    cat = catalog[["image_id", "patient_id"]].assign(image_id=catalog["image_id"].astype(str))
    wanted = cat[cat["image_id"].isin(set(map(str, extra_images)))]
    every = pd.concat([m[["image_id", "patient_id"]].astype({"image_id": str}) for m in manifests.values()] + [wanted],
                      ignore_index=True).drop_duplicates("image_id").sort_values("image_id").reset_index(drop=True)
    unit_of = pd.Series(split_units(every, duplicates), index=every["image_id"].to_numpy())
    held_out = set()
    for manifest in manifests.values():
        kept_out = manifest.loc[manifest["split"].isin(["val", "test"]), "image_id"].astype(str)
        held_out |= set(unit_of[kept_out])
    extra = wanted[~wanted["image_id"].isin(taken)]
    extra = extra[~unit_of[extra["image_id"]].isin(held_out).to_numpy()]
    return extra.assign(split="train")


def output_columns(table: pd.DataFrame) -> list[str]:
    """The label matrix's columns in output order: pathologies, then auxiliary keys."""
    return [c for c in table.columns if c not in ("image_id", "patient_id", "split")]


def output_weights(table: pd.DataFrame, outputs: list[str], scheme: str) -> np.ndarray:
    """(images, outputs) loss weights: for each output, `cxrflow.train.sample_weights` over the images whose label
    for it is defined (positives and negatives each half of that output's weight with "class"); 0 elsewhere."""
    from cxrflow.train import sample_weights

    weights = np.zeros((len(table), len(outputs)), dtype=np.float32)
    for k, column in enumerate(outputs):
        defined = table[column].notna().to_numpy()
        if defined.any():
            rows = pd.DataFrame({"label": table.loc[defined, column].to_numpy().astype(int),
                                 "patient_id": table.loc[defined, "patient_id"].to_numpy()})
            weights[defined, k] = sample_weights(rows, scheme)
    return weights


# --- 3. the loss ---------------------------------------------------------------------------------------------------

def masked_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """BCE over (images, outputs), counting only defined labels (targets NaN elsewhere), each term times its weight;
    summed and divided by the number of images. With one output, every label defined and per-image weights, this
    is `binary_cross_entropy_with_logits(logits, targets, weight=weights)`. Dividing by the images (not by the
    defined labels) keeps micro-batches with gradient accumulation equal to the whole batch."""
    defined = ~torch.isnan(targets)
    terms = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets, nan=0.0),
                                                                 reduction="none")
    return torch.where(defined, terms * weights, torch.zeros_like(terms)).sum() / max(1, logits.shape[0])


# --- the network and its training ----------------------------------------------------------------------------------

def build_multilabel_model(spec: dict, n_outputs: int) -> torch.nn.Module:
    """cxrflow.models.build_model's network with its one-logit head replaced by `n_outputs` logits."""
    from cxrflow.models import build_model

    model = build_model(spec)
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads:
        raise CxrflowError(f"model.name: {spec['name']!r} has no one-logit linear head to widen for train.mode: multilabel")
    name, head = heads[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], torch.nn.Linear(head.in_features, n_outputs, bias=head.bias is not None))
    return model


def load_multilabel(model_path, spec: dict, n_outputs: int) -> torch.nn.Module:
    """A trained multi-label model.pt (plain state dict, read without unpickling), on the CPU, in eval mode."""
    model = build_multilabel_model({**spec, "pretrained": None}, n_outputs)
    try:
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - wrong architecture or output count, a truncated or foreign file
        raise CxrflowError(f"{model_path}: not a {spec['name']} model with {n_outputs} outputs: {str(err)[:300]}") from None
    return model.eval()


def train_multilabel(table: pd.DataFrame, cache: "TensorCache", cfg: dict, out_dir, seed: int,
                     log=print) -> TrainResult:
    """Train one network on the table's train rows, select the epoch on the mean val AUC of the pathology outputs
    (auxiliary outputs train but do not select); writes best.pt and checkpoint.pt (resumable) into out_dir.

    The epoch loop is the binary models' (`cxrflow.train.fit`): the device slot, streamed batches, `BatchAugment`,
    `pick_micro_batch`, `accumulate_step` (an out-of-memory error halves the micro-batch), AdamW with
    `cosine_with_warmup`, the same per-epoch seeding and checkpoints. Only the targets (the label matrix), the loss
    (`masked_bce` with `output_weights`) and the validation score differ."""
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    run_hash = config_hash(model_cfg, train_cfg, cfg["image"], seed, "multilabel", table.to_dict("list"))
    outputs = output_columns(table)
    pathologies = [c for c in outputs if not c.startswith(AUX_PREFIX)]
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    val_rows = table[table["split"] == "val"].reset_index(drop=True)
    weighting = train_cfg.get("weighting", "class")
    val_labels = val_rows[outputs].to_numpy(dtype=float)

    def score(probs: np.ndarray) -> dict:
        aucs = dict(zip(outputs, output_aucs(val_labels, probs)))
        selecting = [aucs[p] for p in pathologies if np.isfinite(aucs[p])]
        return {"val_auc": float(np.mean(selecting)) if selecting else float("nan"),
                **{f"val_auc:{c}": a for c, a in aucs.items()}}

    task = Task(
        train_ids=train_rows["image_id"].to_numpy(dtype=object),
        targets=torch.tensor(train_rows[outputs].to_numpy(dtype=np.float32)),
        weights=torch.tensor(output_weights(train_rows, outputs, weighting)),
        val_ids=val_rows["image_id"].to_numpy(dtype=object),
        loss=masked_bce,
        score=score,
        build=lambda: build_multilabel_model(model_cfg, len(outputs)),
    )
    fitted = fit(task, cache, cfg, out_dir, seed, run_hash, log)
    known = cfg.get("cohorts", {}).get("pathologies", {})
    metadata = {
        "mode": "multilabel",
        "outputs": outputs,
        "pathologies": pathologies,
        "auxiliary_keys": [c.removeprefix(AUX_PREFIX) for c in outputs if c.startswith(AUX_PREFIX)],
        "label_keys": {p: known[p]["positive"] for p in pathologies if p in known},
        **run_metadata(fitted, cfg, run_hash),
        "output": f"{len(outputs)} logits in the order of `outputs`; sigmoid gives P(finding) per output",
        "training_images": len(train_rows),
        "training_labels_defined": {c: int(train_rows[c].notna().sum()) for c in outputs},
        "loss": "masked BCE (cxrflow.multilabel.masked_bce), per-output weights",
    }
    return TrainResult(fitted.best_epoch, fitted.best_val_auc, fitted.history, metadata)


def pathology_predictions(model, cache: "TensorCache", manifest: pd.DataFrame, output: int, n_outputs: int,
                          zscore: bool) -> pd.DataFrame:
    """One pathology's val and test rows of its manifest with `prob` from output `output`: the frame
    cxrflow.evaluate.evaluate_predictions reads, as for a binary model."""
    rows = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    probs = predict_cached(model, cache, rows["image_id"], torch.device("cpu"), zscore).reshape(len(rows), n_outputs)
    return rows.assign(prob=np.round(probs[:, output], 6))


class OutputOf(torch.nn.Module):
    """One output of a multi-label network as a one-logit model, so that prediction, evaluation and Grad-CAM treat
    it as they treat a binary model."""

    def __init__(self, model: torch.nn.Module, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.index : self.index + 1]


def load_for_pathology(model_path, metadata: dict, pathology: str) -> torch.nn.Module:
    """The one-logit model of a pathology: a binary model.pt as it is, or the pathology's output of a multi-label
    model.pt (metadata `mode: multilabel`); on the CPU, in eval mode."""
    from cxrflow.models import load_trained

    if metadata.get("mode", "binary") != "multilabel":
        return load_trained(model_path, metadata["architecture"])
    outputs = metadata["outputs"]
    if pathology not in outputs:
        raise CxrflowError(f"{model_path}: the multi-label model has no output {pathology!r}; its outputs are {outputs}")
    return OutputOf(load_multilabel(model_path, metadata["architecture"], len(outputs)), outputs.index(pathology)).eval()


def run_train_multilabel(manifest_files: dict, index_path, tensor_files, config: dict, model_out, metadata_out,
                         history_out, catalog_path=None, quality_path=None, duplicates_path=None, threads=None,
                         log=print) -> dict:
    """The `train_multilabel` rule: the manifests of the shared split (pathology -> CSV), the tensor cache, and for
    auxiliary outputs the catalog (and, with train.auxiliary_images: catalog, the QC table) -> model.pt (the best
    epoch's state dict), metadata.json, history.csv in one model folder; torch uses `threads` CPU threads."""
    import pyarrow.parquet as pq

    from cxrflow.tensors import TensorCache

    use_threads(threads)
    manifests = {p: pd.read_csv(f, dtype={"image_id": str, "patient_id": str}) for p, f in sorted(manifest_files.items())}
    train_cfg = config["train"]
    aux_keys = list(train_cfg.get("auxiliary_keys", []))
    catalog, extra = None, None
    if aux_keys:
        present = set(pq.read_schema(catalog_path).names)
        missing = [k for k in aux_keys if k not in present]
        if missing:
            raise CxrflowError(f"train.auxiliary_keys: {missing} are not label columns of {catalog_path}")
        catalog = pd.read_parquet(catalog_path, columns=["image_id", "patient_id", "view", *aux_keys])
        catalog["image_id"] = catalog["image_id"].astype(str)
        if train_cfg.get("auxiliary_images", "cohorts") == "catalog":
            cache = TensorCache.open(index_path, tensor_files)
            usable = set(cache.index.index.astype(str))
            if quality_path:
                quality = pd.read_parquet(quality_path, columns=["image_id", "qc_pass"])
                usable &= set(quality.loc[quality["qc_pass"], "image_id"].astype(str))
            views = config.get("cohorts", {}).get("filters", {}).get("views")
            frontal = catalog["view"].isin(views) if views else pd.Series(True, index=catalog.index)
            extra = catalog.loc[frontal & catalog["image_id"].isin(usable), "image_id"]
    duplicates = pd.read_parquet(duplicates_path, columns=["image_id", "group"]) if duplicates_path else None
    table = training_table(manifests, catalog, aux_keys, extra_images=extra, duplicates=duplicates)
    log(f"multilabel training table: {int((table['split'] == 'train').sum())} train and "
        f"{int((table['split'] == 'val').sum())} val images; labels defined per output: "
        f"{ {c: int(table[c].notna().sum()) for c in output_columns(table)} }")
    cache = TensorCache.open(index_path, tensor_files)
    out_dir = Path(model_out).parent
    result = train_multilabel(table, cache, config, out_dir, config["seed"], log=log)
    finish(result, out_dir, model_out, metadata_out, history_out)
    return result.metadata


def run_shared_split(cohort_files: dict, settings: dict, seed: int, manifest_files: dict, duplicates_path=None,
                     log=print) -> dict[str, pd.DataFrame]:
    """The `split_shared` rule: every cohort's manifest from one patient-level assignment (pathology -> file)."""
    from cxrflow.io import write_csv

    duplicates = pd.read_parquet(duplicates_path, columns=["image_id", "group"]) if duplicates_path else None
    cohorts = {p: pd.read_parquet(f) for p, f in cohort_files.items()}
    manifests = shared_split(cohorts, settings, seed, duplicates)
    conflicts = split_conflicts(manifests)
    if not conflicts.empty:  # cannot happen; guard the invariant the multi-label network relies on
        raise AssertionError(f"shared split: {len(conflicts)} patients in two splits, e.g. {conflicts.iloc[0].to_dict()}")
    for pathology, manifest in manifests.items():
        write_csv(manifest, manifest_files[pathology])
        counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
        log(f"shared split {pathology} (images per label):\n{counts.to_string()}")
    patients = pd.concat(manifests.values()).drop_duplicates("patient_id")["split"].value_counts()
    log(f"shared split: patients per split over all cohorts {patients.to_dict()}; no patient in two splits")
    return manifests
