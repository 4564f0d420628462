"""Measure the free-text labeller on the hand-written corpora in tests/data/labels/ (Russian and English).

    python benchmarks/labels.py                  # dev and heldout, before (git HEAD) and after, both languages
    python benchmarks/labels.py --part dev       # tune on dev only; never look at heldout errors while tuning
    python benchmarks/labels.py --errors dev     # list the dev notes the labeller gets wrong
    python benchmarks/labels.py --variants       # the library choices, each switched off in turn (F1 and time)
    python benchmarks/labels.py --quick          # a small sample, for the test that keeps this script working

For each language and part it prints per-key precision, recall and F1 of the positive labels, the micro
average over keys, the micro average of the uncertain labels, the `normal` key, and the positives (and
uncertain keys) emitted on notes that are normal or fully negated (expected: no positive and no uncertain key),
which should be none. "Before" is the labeller and vocabularies of `git rev` (default HEAD), imported from a
temporary folder, so the gain is measured on the same notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cxrflow  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np
import pandas as pd

from cxrflow import labels

CORPORA = ROOT / "tests" / "data" / "labels"
KEYS = ROOT / "config" / "labels" / "keys.yaml"
LANGUAGES = {"ru": "ru.yaml", "en": "en.yaml"}


def read_corpus(language: str) -> pd.DataFrame:
    table = pd.read_csv(CORPORA / f"{language}_notes.csv", dtype=str, keep_default_na=False)
    for column in ("positive", "uncertain"):
        table[column] = table[column].map(lambda cell: {key for key in cell.split(";") if key})
    table["normal"] = table["normal"].astype(int)
    return table


def predict(texts: pd.Series, module, vocab, keys: list[str]) -> tuple[pd.DataFrame, float]:
    """Labels (1 / 0 / <NA> for uncertain) and the seconds they took."""
    started = time.perf_counter()
    predicted = module.label_texts(texts.reset_index(drop=True), vocab, keys)
    return predicted, time.perf_counter() - started


def as_sets(predicted: pd.DataFrame) -> tuple[list[set], list[set], np.ndarray]:
    """Per note: the keys labelled 1, the keys left missing (uncertain), and the normal flag."""
    keys = [key for key in predicted.columns if key != labels.NORMAL_KEY]
    values = predicted[keys]
    positive = [set(np.array(keys)[row]) for row in values.eq(1).fillna(False).to_numpy(dtype=bool)]
    uncertain = [set(np.array(keys)[row]) for row in values.isna().to_numpy(dtype=bool)]
    if labels.NORMAL_KEY in predicted.columns:
        normal = predicted[labels.NORMAL_KEY].fillna(0).to_numpy(dtype=int)
    else:  # a labeller from before the normal key
        normal = np.zeros(len(predicted), dtype=int)
    return positive, uncertain, normal


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(corpus: pd.DataFrame, predicted: pd.DataFrame) -> dict:
    """Per-key and micro P/R/F1 of positives, micro of uncertain, the normal key, and positives on clean notes."""
    positive, uncertain, normal = as_sets(predicted)
    keys = sorted(set().union(*corpus["positive"], *corpus["uncertain"], *positive, *uncertain))
    per_key, totals, uncertain_totals = {}, np.zeros(3, int), np.zeros(3, int)
    for key in keys:
        counts = np.zeros(3, int)  # tp, fp, fn
        u_counts = np.zeros(3, int)
        for want, got, want_u, got_u in zip(corpus["positive"], positive, corpus["uncertain"], uncertain):
            counts += [key in want and key in got, key not in want and key in got, key in want and key not in got]
            u_counts += [key in want_u and key in got_u, key not in want_u and key in got_u,
                         key in want_u and key not in got_u]  # fmt: skip
        totals += counts
        uncertain_totals += u_counts
        per_key[key] = {"n": int(counts[0] + counts[2]), **dict(zip("prf", _prf(*counts))),
                        "n_uncertain": int(u_counts[0] + u_counts[2])}  # fmt: skip
    want_normal = corpus["normal"].to_numpy(dtype=int)
    normal_counts = [int(((want_normal == 1) & (normal == 1)).sum()), int(((want_normal == 0) & (normal == 1)).sum()),
                     int(((want_normal == 1) & (normal == 0)).sum())]  # fmt: skip
    clean = [(not want) and (not want_u) for want, want_u in zip(corpus["positive"], corpus["uncertain"])]
    on_clean = [(note_id, sorted(got), sorted(got_u))
                for note_id, is_clean, got, got_u in zip(corpus["note_id"], clean, positive, uncertain)
                if is_clean and (got or got_u)]  # fmt: skip
    pairs = zip(corpus["positive"], positive, corpus["uncertain"], uncertain)
    exact = sum(want == got and want_u == got_u for want, got, want_u, got_u in pairs)
    return {
        "notes": len(corpus),
        "per_key": per_key,
        "micro": dict(zip("prf", _prf(*totals))),
        "uncertain_micro": dict(zip("prf", _prf(*uncertain_totals))),
        "normal": dict(zip("prf", _prf(*normal_counts))),
        "clean_notes": int(sum(clean)),
        "positives_on_clean": sum(len(got) for _, got, _ in on_clean),
        "uncertain_on_clean": sum(len(got_u) for _, _, got_u in on_clean),
        "clean_notes_hit": on_clean,
        "exact": exact,
    }


def errors(corpus: pd.DataFrame, predicted: pd.DataFrame) -> list[str]:
    positive, uncertain, normal = as_sets(predicted)
    lines = []
    for row, (got, got_u, got_n) in enumerate(zip(positive, uncertain, normal)):
        want, want_u, want_n = corpus["positive"].iloc[row], corpus["uncertain"].iloc[row], corpus["normal"].iloc[row]
        if got != want or got_u != want_u or got_n != want_n:
            parts = []
            if got - want or want - got:
                parts.append(f"pos +{sorted(got - want)} -{sorted(want - got)}")
            if got_u - want_u or want_u - got_u:
                parts.append(f"unc +{sorted(got_u - want_u)} -{sorted(want_u - got_u)}")
            if got_n != want_n:
                parts.append(f"normal {got_n} want {want_n}")
            lines.append(f"{corpus['note_id'].iloc[row]}: {'; '.join(parts)}\n    {corpus['text'].iloc[row]!r}")
    return lines


def import_labeller(rev: str, workdir: Path):
    """The labels module and vocabularies of git revision ``rev``, imported from ``workdir``."""
    files = {"labels.py": "src/cxrflow/labels.py", "keys.yaml": "config/labels/keys.yaml",
             "ru.yaml": "config/labels/ru.yaml", "en.yaml": "config/labels/en.yaml"}  # fmt: skip
    for name, path in files.items():
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
        (workdir / name).write_bytes(text)
    spec = importlib.util.spec_from_file_location(f"labels_{rev}", workdir / "labels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module, workdir


def table(result: dict, before: dict | None = None) -> str:
    """A per-key table; with ``before``, its F1 beside the new one."""
    head = f"{'key':32s} {'n':>4s} {'P':>6s} {'R':>6s} {'F1':>6s}" + (f" {'F1 before':>10s}" if before else "")
    lines = [head, "-" * len(head)]
    rows = list(result["per_key"].items())
    for key, stats in sorted(rows, key=lambda item: -item[1]["n"]):
        if stats["n"] == 0 and stats["f"] == 1.0:
            continue
        line = f"{key:32s} {stats['n']:4d} {stats['p']:6.3f} {stats['r']:6.3f} {stats['f']:6.3f}"
        if before:
            old = before["per_key"].get(key)
            line += f" {old['f']:10.3f}" if old else f" {'-':>10s}"
        lines.append(line)
    for name in ("micro", "uncertain_micro", "normal"):
        stats = result[name]
        line = f"{name:32s} {'':4s} {stats['p']:6.3f} {stats['r']:6.3f} {stats['f']:6.3f}"
        if before:
            line += f" {before[name]['f']:10.3f}"
        lines.append(line)
    lines.append(
        f"notes {result['notes']}, exact {result['exact']}; normal or fully negated notes {result['clean_notes']}: "
        f"positives emitted {result['positives_on_clean']}, uncertain emitted {result['uncertain_on_clean']}"
        + (f" (before: {before['positives_on_clean']}, {before['uncertain_on_clean']})" if before else "")
    )
    return "\n".join(lines)


def variants(vocab) -> dict:
    """The library choices, each switched off in turn."""
    out = {"as shipped": vocab}
    if vocab.typos is not None:
        out["no typo tolerance (rapidfuzz)"] = dataclasses.replace(vocab, typos=None)
        out["typos without dictionary veto (pymorphy3)"] = dataclasses.replace(
            vocab, typos=dataclasses.replace(vocab.typos, morphology=None)
        )
    if vocab.morphology is not None:
        out["no morphology for lists (pymorphy3)"] = dataclasses.replace(vocab, morphology=None)
    if vocab.abbreviations is not None:
        out["no abbreviations"] = dataclasses.replace(vocab, abbreviations=None)
    if vocab.lookalikes:
        out["no look-alike folding"] = dataclasses.replace(vocab, lookalikes=None)
    return out


def razdel_sentences(text: str):
    import razdel

    return [sentence for sentence in razdel.sentenize(text) if sentence.text.strip()]


def context_labels(texts: pd.Series, vocab, keys: list[str]) -> pd.DataFrame:
    """English labels with medspaCy's ConText (its default rules, spacy.blank: no model download) deciding
    negation and uncertainty in place of the vocabulary's cues; the mentions are the vocabulary's own."""
    import spacy
    from medspacy.context import ConText  # noqa: F401  (registers the medspacy_context factory)
    from spacy.util import filter_spans

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    context = nlp.add_pipe("medspacy_context")
    rows = []
    for text in texts:
        states = dict.fromkeys(keys, labels.UNMENTIONED)
        normal_phrase = False
        for unit in labels.split_units(labels.normalise(text, vocab), vocab):
            unit, _ = labels._expand(unit, vocab)
            matched = labels._blank(unit, vocab.ignore)
            if vocab.normal is not None and vocab.normal.search(matched):
                normal_phrase = True
                matched = labels._blank(matched, vocab.normal)
            doc = nlp(unit)
            spans = []
            for key, pattern in list(vocab.findings.items()) + [
                (k.split("|")[0], p) for k, p in vocab.descriptors.items()
            ]:
                for match in pattern.finditer(matched):
                    span = doc.char_span(match.start(), match.end(), label=key, alignment_mode="expand")
                    if span is not None:
                        spans.append(span)
            doc.ents = filter_spans(spans)
            doc = context(doc)
            for ent in doc.ents:
                state = (
                    labels.NEGATED if ent._.is_negated else labels.UNCERTAIN if ent._.is_uncertain else labels.AFFIRMED
                )
                if ent.label_ in states:
                    states[ent.label_] = max(states[ent.label_], state)
        row = {key: (1 if state == labels.AFFIRMED else pd.NA if state == labels.UNCERTAIN else 0)
               for key, state in states.items()}  # fmt: skip
        found = any(state in (labels.AFFIRMED, labels.UNCERTAIN) for state in states.values())
        row[labels.NORMAL_KEY] = int(normal_phrase and not found)
        rows.append(row)
    return pd.DataFrame(rows, columns=keys).astype("Int8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["dev", "heldout", "all"], default=None, help="default: dev and heldout")
    parser.add_argument("--language", choices=sorted(LANGUAGES), action="append")
    parser.add_argument("--rev", default="HEAD", help="git revision for the before figures (default HEAD)")
    parser.add_argument("--no-before", action="store_true")
    parser.add_argument("--errors", choices=["dev", "heldout", "all"], help="list the notes labelled wrongly")
    parser.add_argument("--variants", action="store_true", help="switch each library choice off in turn")
    parser.add_argument("--quick", action="store_true", help="60 dev notes per language")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    keys = labels.load_keys(KEYS)
    parts = [args.part] if args.part else ["dev", "heldout"]
    workdir = Path(tempfile.mkdtemp(prefix="cxrflow-labels-before-"))
    before_module = None
    if not args.no_before:
        before_module, before_dir = import_labeller(args.rev, workdir)
        before_keys = before_module.load_keys(before_dir / "keys.yaml")
    figures: dict = {}
    for language in args.language or sorted(LANGUAGES):
        corpus = read_corpus(language)
        vocab = labels.load_vocabulary(ROOT / "config" / "labels" / LANGUAGES[language], keys)
        if args.quick:
            corpus = corpus[corpus["part"] == "dev"].head(60)
            parts = ["dev"]
        for part in parts:
            subset = corpus if part == "all" else corpus[corpus["part"] == part]
            subset = subset.reset_index(drop=True)
            predicted, seconds = predict(subset["text"], labels, vocab, keys)
            result = score(subset, predicted)
            before = None
            if before_module is not None:
                old_vocab = before_module.load_vocabulary(before_dir / LANGUAGES[language], before_keys)
                old_predicted, _ = predict(subset["text"], before_module, old_vocab, before_keys)
                before = score(subset, old_predicted)
            typos = predicted.attrs.get("typos", {})
            figures.setdefault(language, {})[part] = {
                "notes": result["notes"], "seconds": round(seconds, 3), "typo_rows": typos.get("rows", 0),
                **{name: result[name] for name in ("micro", "uncertain_micro", "normal")},
                "positives_on_clean": result["positives_on_clean"], "uncertain_on_clean": result["uncertain_on_clean"],
                "before": None if before is None else {name: before[name] for name in ("micro", "uncertain_micro")},
            }  # fmt: skip
            print(f"\n== {language} {part}: {len(subset)} notes, {seconds * 1000:.0f} ms; typo tolerance fired on "
                  f"{typos.get('rows', 0)} notes {typos.get('words', {})}")  # fmt: skip
            print(table(result, before))
            if args.variants:
                print(f"\n-- {language} {part}: variants (micro F1 of positives / uncertain / normal, ms)")
                for name, variant in variants(vocab).items():
                    got, seconds = predict(subset["text"], labels, variant, keys)
                    stats = score(subset, got)
                    print(f"{name:45s} {stats['micro']['f']:.3f} {stats['uncertain_micro']['f']:.3f} "
                          f"{stats['normal']['f']:.3f} {seconds * 1000:6.0f}")  # fmt: skip
                if language == "ru" and importlib.util.find_spec("razdel") is not None:
                    original_normalise, original_split = labels.normalise, labels.split_units
                    # razdel reads capitals: split the note as written, then normalise each sentence.
                    labels.normalise = lambda text, _vocab: text
                    labels.split_units = lambda text, _vocab: [
                        original_normalise(sentence.text, _vocab).strip() for sentence in razdel_sentences(text)
                    ]
                    try:
                        got, seconds = predict(subset["text"], labels, vocab, keys)
                    finally:
                        labels.normalise, labels.split_units = original_normalise, original_split
                    stats = score(subset, got)
                    print(
                        f"{'razdel sentence splitter':45s} {stats['micro']['f']:.3f} "
                        f"{stats['uncertain_micro']['f']:.3f} {stats['normal']['f']:.3f} {seconds * 1000:6.0f}"
                    )
                if language == "en" and importlib.util.find_spec("medspacy") is not None:
                    started = time.perf_counter()
                    got = context_labels(subset["text"], vocab, keys)
                    seconds = time.perf_counter() - started
                    stats = score(subset, got)
                    print(
                        f"{'medspaCy ConText for negation/uncertainty':45s} {stats['micro']['f']:.3f} "
                        f"{stats['uncertain_micro']['f']:.3f} {stats['normal']['f']:.3f} {seconds * 1000:6.0f}"
                    )
            if args.errors in (part, "all") or (args.errors == "all" and part == "all"):
                print("\n".join(errors(subset, predicted)))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
