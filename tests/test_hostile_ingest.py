"""Hostile archives and tables through the real workflow, at ingest: paths that escape source.images, entries a
listing chokes on, and tables a parser chokes on. Each bad row is ledgered with its own reason and the counts add
up (input rows = catalog + ledger, every catalog image has a QC verdict); each bad table or folder stops the run
with one `cxrflow error:` line naming it, without a traceback; no file's bytes reach a ledger."""

from __future__ import annotations

import csv
import gzip
import io
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SNAKEMAKE, copy_repo
from hostile import chest, png

from cxrflow.errors import CxrflowError

HEADER = ["image_id", "patient_id", "sex", "age", "view", "file", "study_date", "annotation"]
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"
NOTE = "Без патологических изменений."


def write_table(path: Path, rows: list[list[str]], encoding="utf-8", before=b"") -> None:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([HEADER, *rows])
    path.write_bytes(before + out.getvalue().encode(encoding))


def row(image_id: str, file: str, note: str = NOTE, patient: str | None = None) -> list[str]:
    return [image_id, patient or f"P-{image_id}", "Ж", "50", "PA", file, "2021-03-04", note]


def build_archive(resources: Path) -> tuple[list[list[str]], dict[str, str]]:
    """The archive and its table rows. Returns the rows and, per image id, the expected outcome: 'ok' (in the
    catalog) or the ingest ledger reason."""
    archive, outside = resources / "archive", resources / "outside"
    (archive / "imgs").mkdir(parents=True)
    outside.mkdir()
    def image(seed):
        return (chest(seed=seed) * 255).astype(np.uint8)

    for i in range(12):
        png(archive / "imgs" / f"good_{i}.png", image(i))
    png(archive / "imgs" / "target.png", image(20))
    png(archive / "imgs" / "absolute.png", image(21))
    png(outside / "secret.png", image(22))  # a good radiograph, but not the archive's
    (outside / "passwd").write_bytes(SECRET)
    (archive / "imgs" / "notes.png").write_bytes(SECRET)  # inside, but text: the decoder must not quote it
    imgs = archive / "imgs"
    os.symlink(imgs / "loop.png", imgs / "loop.png")
    os.mkfifo(imgs / "pipe.png")
    (imgs / "folder.png").mkdir()
    os.symlink(imgs / "gone.png", imgs / "dangling.png")
    os.symlink("/dev/null", imgs / "device.png")
    os.symlink(imgs / "target.png", imgs / "link_in.png")
    os.symlink("../../outside/secret.png", imgs / "link_out.png")
    os.symlink(outside, archive / "outdir")
    expected = {f"good_{i}": "ok" for i in range(12)}
    rows = [row(f"good_{i}", f"imgs/good_{i}.png") for i in range(12)]
    cases = {
        "link_in": ("imgs/link_in.png", "ok"),
        "text_inside": ("imgs/notes.png", "ok"),  # in the catalog; QC leaves it out as unreadable
        "absolute_inside": (str((archive / "imgs" / "absolute.png").resolve()), "ok"),
        "etc_passwd": ("../../../../../../../../../../etc/passwd", "outside_archive"),
        "etc_hostname": ("/etc/hostname", "outside_archive"),
        "proc_environ": ("/proc/self/environ", "outside_archive"),
        "dotdot_png": ("../outside/secret.png", "outside_archive"),
        "link_out": ("imgs/link_out.png", "outside_archive"),
        "via_dir_link": ("outdir/secret.png", "outside_archive"),
        "via_dir_link_passwd": ("outdir/passwd", "outside_archive"),
        "device": ("imgs/device.png", "outside_archive"),
        "loop": ("imgs/loop.png", "symlink_loop"),
        "pipe": ("imgs/pipe.png", "not_a_file"),
        "folder": ("imgs/folder.png", "not_a_file"),
        "dangling": ("imgs/dangling.png", "missing_file"),
        "absent": ("imgs/absent.png", "missing_file"),
        "long_name": ("x" * 300 + "/a.png", "unreadable"),
    }
    for image_id, (file, outcome) in cases.items():
        rows.append(row(image_id, file))
        expected[image_id] = outcome
    return rows, expected


def make_workdir(tmp: Path, overlay: dict | None = None) -> Path:
    workdir = copy_repo(tmp / "repo")
    config = {"source": {"annotations": "resources/notes.csv", "images": "resources/archive"},
              "preprocess": {"shards": 1}}
    for key, value in (overlay or {}).items():
        config[key] = {**config.get(key, {}), **value}
    (workdir / "hostile.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (workdir / "resources").mkdir(exist_ok=True)
    return workdir


def snakemake(workdir: Path, target: str = "results/catalog.parquet") -> subprocess.CompletedProcess:
    env = {**os.environ, "CXRFLOW_PSEUDONYM_KEY": "test-key"}  # module fixtures run before conftest's key fixture
    return subprocess.run([SNAKEMAKE, target, "--cores", "2", "--configfile", "hostile.yaml"], cwd=workdir,
                          capture_output=True, text=True, timeout=900, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxrflow error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def no_file_bytes_in(results: Path) -> None:
    for path in results.rglob("*.csv"):
        text = path.read_bytes()
        assert SECRET[:8] not in text and SECRET[:8].hex().encode() not in text, path


def accounting(workdir: Path, n_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Input rows = catalog + ledger (the ingest ledger's rows, each an input row); every catalog image has a QC
    verdict."""
    catalog = pd.read_parquet(workdir / "results/private/catalog.parquet")
    catalog["image_id"] = catalog.pop("source_id")  # the table's own ids; image_id is the pseudonym
    ledger = pd.read_csv(workdir / "results/private/ingest/ledger.csv", dtype=str, keep_default_na=False)
    assert n_rows == len(catalog) + len(ledger), (n_rows, len(catalog), len(ledger))
    quality = workdir / "results/quality/metrics.parquet"
    if quality.exists():
        verdicts = pd.read_parquet(quality)
        assert set(verdicts["image_id"]) == set(pd.read_parquet(workdir / "results/catalog.parquet")["image_id"])
        assert verdicts["qc_pass"].notna().all()
    return catalog, ledger


@pytest.fixture(scope="module")
def archive_run(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("hostile_ingest"))
    rows, expected = build_archive(workdir / "resources")
    write_table(workdir / "resources" / "notes.csv", rows)
    result = snakemake(workdir, "results/quality/metrics.parquet")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, expected, len(rows)


def test_every_bad_path_costs_only_its_row_with_its_own_reason(archive_run):
    workdir, expected, n_rows = archive_run
    catalog, ledger = accounting(workdir, n_rows)
    got = {image_id: "ok" for image_id in catalog["image_id"]}
    got |= dict(zip(ledger["source_item"], ledger["reason"]))
    table = pd.DataFrame({"expected": expected, "got": pd.Series(got)})
    print("\n" + table.to_string())
    assert got == expected
    outside = ledger[ledger["reason"] == "outside_archive"]
    assert outside["detail"].str.contains("outside").all()


def test_no_outside_file_reaches_a_later_stage(archive_run):
    workdir, _, _ = archive_run
    quality = pd.read_parquet(workdir / "results/quality/metrics.parquet")
    private = pd.read_parquet(workdir / "results/private/catalog.parquet")
    quality["image_id"] = quality["image_id"].map(dict(zip(private["image_id"], private["source_id"])))
    verdicts = quality.set_index("image_id")
    assert not verdicts.index.isin(["dotdot_png", "link_out", "via_dir_link", "etc_passwd"]).any()
    assert verdicts["qc_pass"].sum() == 14  # the twelve good images, the link inside and the absolute path
    assert not verdicts.loc["text_inside", "qc_pass"]
    ingest_ledger = (workdir / "results/private/ingest/ledger.csv").read_bytes()
    assert SECRET[:8] not in ingest_ledger and SECRET[:8].hex().encode() not in ingest_ledger


def test_no_file_bytes_reach_any_ledger(archive_run):
    workdir, _, _ = archive_run
    no_file_bytes_in(workdir / "results")


def test_a_missing_image_folder_is_one_line(tmp_path):
    workdir = make_workdir(tmp_path, {"source": {"images": "resources/archiv"}})
    write_table(workdir / "resources" / "notes.csv", [row("a", "imgs/a.png")])
    error = one_line_error(snakemake(workdir))
    assert "source.images" in error and "resources/archiv" in error and "no such folder" in error


def test_a_folder_where_almost_no_listed_file_exists_is_one_line(tmp_path):
    workdir = make_workdir(tmp_path, {"source": {"images": "resources"}})  # one level too high
    rows, _ = build_archive(workdir / "resources")
    write_table(workdir / "resources" / "notes.csv", rows)
    error = one_line_error(snakemake(workdir))
    assert "source.images" in error and "source.min_found_fraction" in error and "missing_file" in error


def test_ledger_lines_are_file_lines_when_notes_hold_line_breaks(tmp_path):
    workdir = make_workdir(tmp_path)
    rows, _ = build_archive(workdir / "resources")
    note = "Без патологии.\nСердце не расширено.\n\nКорни структурны."
    notes = [row(f"multi_{i}", f"imgs/good_{i}.png", note=note) for i in range(3)]
    absent = row("gone", "imgs/absent.png")
    # blank lines before the header, three notes of four lines each, then the row whose file is missing.
    write_table(workdir / "resources" / "notes.csv", [*notes, absent], before=b"\n\r\n")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, ledger = accounting(workdir, 4)
    gone = ledger.set_index("source_item").loc["gone", "detail"]
    text = (workdir / "resources" / "notes.csv").read_text().splitlines()
    line = int(gone.split(":")[0].removeprefix("line "))
    assert text[line - 1].startswith("gone,"), (gone, text[line - 1])
    assert line == 2 + 1 + 3 * 4 + 1


def xlsx_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    return buffer.getvalue()


def table_bytes(rows) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([HEADER, *rows])
    return out.getvalue().encode()


ROWS = [row(f"r{i}", f"imgs/good_{i}.png") for i in range(3)]
BAD_TABLES = {
    "xlsx renamed csv": (xlsx_bytes(), "the file is a ZIP archive (an Excel .xlsx"),
    "pdf renamed csv": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "the file is a PDF document"),
    "gzip named csv": (gzip.compress(table_bytes(ROWS)), "the file is gzip-compressed, not a CSV/TSV text table; "
                                                         "name it .csv.gz"),
    "dicom named csv": (b"\x00" * 128 + b"DICM" + b"\x02\x00" * 40, "the file is a DICOM object"),
    "utf-16 without a bom": (table_bytes(ROWS).decode().encode("utf-16-le"),
                             "looks like UTF-16 without a byte-order mark; set source.encoding: utf-16-le"),
    "zero bytes": (table_bytes(ROWS)[:40] + b"\x00\x01\x02" + table_bytes(ROWS)[40:], "holds zero bytes"),
    "utf-16 bom but cp1251 configured": (table_bytes(ROWS).decode().encode("utf-16"), "UTF-16 byte-order mark"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TABLES))
def test_a_file_posing_as_a_table_is_named_as_what_it_is(tmp_path, kind):
    from cxrflow.ingest import read_table

    data, message = BAD_TABLES[kind]
    (tmp_path / "notes.csv").write_bytes(data)
    encoding = "cp1251" if "cp1251" in kind else "auto"
    with pytest.raises(CxrflowError, match=r"^\S*notes.csv: ") as caught:
        read_table(tmp_path / "notes.csv", encoding)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_binary_table_stops_the_workflow_with_one_line(tmp_path):
    workdir = make_workdir(tmp_path)
    build_archive(workdir / "resources")
    (workdir / "resources" / "notes.csv").write_bytes(xlsx_bytes())
    error = one_line_error(snakemake(workdir))
    assert "resources/notes.csv: the file is a ZIP archive" in error, error


@pytest.mark.parametrize("kind, line", [("a 40 MB note", 3), ("an unclosed quote", 4)])
def test_a_record_too_long_for_the_reader_is_named_by_its_line(tmp_path, kind, line):
    """Over twice the reader's 16 MB block: a shorter record may or may not straddle a whole block."""
    from cxrflow.ingest import read_table

    if kind == "a 40 MB note":
        data = table_bytes([ROWS[0], row("huge", "imgs/good_0.png", "Норма. " * 3_500_000), *ROWS[1:]])
    else:
        data = (table_bytes(ROWS[:2]) + 'x,P,Ж,50,PA,imgs/a.png,2021-03-04,"не закрыта\n'.encode()
                + b"y,P,F,50,PA,imgs/b.png,2021-03-04,text\n" * 1_100_000)
    (tmp_path / "notes.csv").write_bytes(data)
    with pytest.raises(CxrflowError) as caught:
        read_table(tmp_path / "notes.csv")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'notes.csv'}: line {line} (first field ") and "unclosed quote" in message
    assert "straddl" not in message and "\n" not in message


def test_utf16_with_a_byte_order_mark_is_read_through_the_workflow(tmp_path):
    workdir = make_workdir(tmp_path)
    rows, expected = build_archive(workdir / "resources")
    (workdir / "resources" / "notes.csv").write_bytes(table_bytes(rows).decode().encode("utf-16"))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    catalog, _ = accounting(workdir, len(rows))
    assert sorted(catalog["image_id"]) == sorted(k for k, v in expected.items() if v == "ok")
    assert catalog.set_index("image_id").loc["good_0", "text"] == NOTE


@pytest.mark.parametrize("encoding", ["utf-8", "cp1251", "utf-16"])
def test_blank_lines_before_the_header_are_skipped_and_lines_stay_file_lines(tmp_path, encoding):
    from cxrflow.ingest import read_table

    note = "Сердце расширено.\n\nАорта уплотнена."
    text = "\n \r\n\n" + table_bytes([row("a", "imgs/a.png", note), row("b", "imgs/b.png")]).decode()
    (tmp_path / "notes.csv").write_bytes(text.encode(encoding))
    table = read_table(tmp_path / "notes.csv")
    assert list(table["image_id"]) == ["a", "b"] and table["annotation"].iloc[0] == note
    assert list(table.attrs["record_lines"].of([0, 1])) == [5, 8]


def test_an_unreadable_vocabulary_is_one_line(tmp_path):
    workdir = make_workdir(tmp_path)
    rows, _ = build_archive(workdir / "resources")
    write_table(workdir / "resources" / "notes.csv", rows)
    (workdir / "config/labels/ru.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    error = one_line_error(snakemake(workdir))
    assert "source.vocabulary" in error and "ru.yaml" in error, error


def test_an_unreadable_label_map_is_one_line(tmp_path, root, keys_file):
    from cxrflow.ingest import build_catalog

    (tmp_path / "nih.yaml").write_bytes("labels:\n  Cardiomegaly: enlarged_heart\n".encode("utf-16"))
    (tmp_path / "Data_Entry.csv").write_text("Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,"
                                             "View Position\na.png,No Finding,1,50,F,PA\n")
    source = {"format": "nih", "annotations": str(tmp_path / "Data_Entry.csv"), "check_files": False,
              "label_map": str(tmp_path / "nih.yaml")}
    with pytest.raises(CxrflowError, match=r"^source.label_map: .*nih.yaml is UTF-16 text; save it as UTF-8"):
        build_catalog(source, keys_file, base="/")
    (tmp_path / "nih.yaml").write_bytes("labels:\n  Cardiomegaly: enlarged_heart\n".encode("cp1251") + b"# \xe9\n")
    with pytest.raises(CxrflowError, match=r"^source.label_map: .*nih.yaml is not UTF-8 text \(line 3"):
        build_catalog(source, keys_file, base="/")
    (tmp_path / "nih.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(CxrflowError, match=r"^source.label_map: .*nih.yaml is a binary file"):
        build_catalog(source, keys_file, base="/")


def test_a_full_disk_during_ingest_is_one_line_and_leaves_nothing_partial(tmp_path):
    workdir = make_workdir(tmp_path)
    rows, _ = build_archive(workdir / "resources")
    write_table(workdir / "resources" / "notes.csv", rows)
    results = workdir / "results"
    results.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(results)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to simulate a full disk: {mounted.stderr.strip()}")
    try:
        filler = results / "filler"
        # Leave one page: the first job's log fits, its first table (the image index) does not.
        with open(filler, "wb") as out:
            while os.statvfs(results).f_bavail * os.statvfs(results).f_frsize > 4 << 10:
                out.write(b"\0" * 4096)
                out.flush()
        error = one_line_error(snakemake(workdir))
        assert "disk full while writing results/" in error and "nothing partial was kept" in error, error
        left = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
        assert left == ["filler", "logs/image_index.log"], left
    finally:
        subprocess.run(["umount", str(results)], check=False)


def test_line_numbers_survive_a_literal_quote_inside_an_unquoted_field(tmp_path):
    """A quote inside an unquoted field is a plain character to the parser; counting quotes alone would shift every
    later line number, so the lines are then read the parser's way."""
    from cxrflow.ingest import read_table

    text = ("\n".join([",".join(HEADER),
                       'a,P1,Ж,50,PA,imgs/a.png,2021-03-04,узел 5" в диаметре',
                       'b,P2,Ж,50,PA,imgs/b.png,2021-03-04,"две\nстроки"',
                       "",
                       "c,P3,Ж,50,PA,imgs/c.png,2021-03-04,норма"]) + "\n")
    (tmp_path / "notes.csv").write_text(text)
    table = read_table(tmp_path / "notes.csv")
    assert list(table["image_id"]) == ["a", "b", "c"]
    assert table["annotation"].iloc[0] == 'узел 5" в диаметре'
    assert list(table.attrs["record_lines"].of([0, 1, 2])) == [2, 3, 6]
