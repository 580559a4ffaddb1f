"""`hrsa store ...`: every verb, and every error path gives one line, exit 2, and changes nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from hrsa.cli import cli
from hrsa.store import ActivationStore
from hrsa.store.testing import DOC_LENGTHS, HIDDEN, expected_layer


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def url(tmp_path, filled_store: ActivationStore) -> str:
    return str(tmp_path / "store")


def test_help_lists_the_verbs() -> None:
    code, out, _ = _run("--help")
    assert code == 0 and "store" in out
    code, out, _ = _run("store", "--help")
    assert code == 0 and all(verb in out for verb in ("ls", "info", "get", "verify", "rm"))


def test_ls_and_info(url: str) -> None:
    code, out, _ = _run("store", "ls", url)
    assert code == 0 and "corpus-" in out and "4/4" in out
    code, out, _ = _run("store", "info", url, "m")
    assert code == 0 and f"D={HIDDEN}" in out and "4/4 units done" in out and "float32" in out


def test_ls_prints_ids_whole(tmp_path) -> None:
    """Ids are what a user copies from `store ls` into the next command: rich's 80 columns off a terminal cut two
    checkpoints to the same "DeepSeek-…" (and the corpus id too)."""
    from hrsa.store.testing import make_table

    store = ActivationStore.open(str(tmp_path / "s"), mode="a")
    cid = store.write_corpus(make_table((10, 10)), tokenizer={"name": "tok", "fingerprint": "fp"})
    names = [f"DeepSeek-R1-Distill-Qwen-1.5B-emb--step_{step:06d}" for step in (100, 200)]
    for mid in names:
        store.create_model(mid, corpus=cid, n_hidden_states=1, hidden_size=4, dtype="float32")
    code, out, _ = _run("store", "ls", str(tmp_path / "s"))
    assert code == 0 and all(name in out for name in names) and cid in out, out


def test_get_counts_negative_layers_from_the_end_as_analyze_does(url: str, tmp_path,
                                                                  filled_store: ActivationStore) -> None:
    """`--layer -1` is the last hidden state, as `hrsa analyze --hidden-states -1` (one rule: ModelInfo's)."""
    last = filled_store.model_info("m").n_hidden_states - 1
    code, stdout, _ = _run("store", "get", url, "m", "--layer", "-1", "--out", str(tmp_path / "x.npy"))
    assert code == 0, stdout
    assert np.array_equal(np.load(tmp_path / "x.npy"), expected_layer(filled_store, "m", last))


def test_get_writes_npy(url: str, tmp_path, filled_store: ActivationStore) -> None:
    out = tmp_path / "x.npy"
    code, stdout, _ = _run("store", "get", url, "m", "--layer", "2", "--tokens", "100:300", "--out", str(out))
    assert code == 0, stdout
    assert np.array_equal(np.load(out), expected_layer(filled_store, "m", 2)[100:300])
    code, _, _ = _run("store", "get", url, "m", "--layer", "2", "--docs", "0,2-3", "--exclude-first", "--out", str(out))
    assert code == 0 and np.load(out).shape == (DOC_LENGTHS[0] + DOC_LENGTHS[2] + DOC_LENGTHS[3] - 3, HIDDEN)
    code, stdout, _ = _run("store", "get", url, "m", "--layer", "2", "--tokens", "-10:", "--out", str(tmp_path / "x.txt"))
    assert code == 0 and f"wrote {tmp_path / 'x.txt'}:" in stdout and not (tmp_path / "x.txt.npy").exists()
    assert np.array_equal(np.load(tmp_path / "x.txt"), expected_layer(filled_store, "m", 2)[-10:])  # where it says


def test_get_interrupted_while_writing_leaves_the_earlier_file_and_no_partial_one(url: str, tmp_path,
                                                                                     monkeypatch) -> None:
    """A kill or a full disk mid-write must not leave a truncated .npy at --out (nor replace an earlier one)."""
    out = tmp_path / "outs" / "x.npy"
    out.parent.mkdir()
    out.write_bytes(b"the earlier file")

    def save_half(file, values) -> None:
        file.write(b"\x93NUMPY half a header")
        raise OSError(28, "No space left on device")

    import hrsa.store.cli as store_cli

    monkeypatch.setattr(store_cli, "_save_by_row_groups", save_half)
    code, _, _ = _run("store", "get", url, "m", "--layer", "2", "--out", str(out))
    assert code != 0
    assert out.read_bytes() == b"the earlier file" and sorted(p.name for p in out.parent.iterdir()) == ["x.npy"]


def test_get_writes_through_a_symlink_and_takes_the_longest_names(url: str, tmp_path,
                                                                   filled_store: ActivationStore) -> None:
    """--out is written as open() would write it: through a symlink (the link stays one), and under any name the
    filesystem takes (a temporary name derived from --out's was 14 characters longer: a traceback after the read)."""
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.npy"
    link.symlink_to(tmp_path / "real" / "x.npy")
    code, stdout, stderr = _run("store", "get", url, "m", "--layer", "2", "--out", str(link))
    assert code == 0, stderr
    assert link.is_symlink() and np.array_equal(np.load(tmp_path / "real" / "x.npy"), expected_layer(filled_store, "m", 2))
    longest = tmp_path / ("x" * 251 + ".npy")  # 255 bytes, the most a name may have
    code, stdout, stderr = _run("store", "get", url, "m", "--layer", "2", "--tokens", "0:10", "--out", str(longest))
    assert code == 0, stderr
    assert np.array_equal(np.load(longest), expected_layer(filled_store, "m", 2)[:10])


def test_get_widens_bf16_exactly(tmp_path) -> None:
    from hrsa.store.testing import fill_model, new_model

    store = ActivationStore.open(tmp_path / "bf", mode="a")
    new_model(store, "m", dtype="bfloat16")
    fill_model(store, "m")
    code, _, _ = _run("store", "get", str(tmp_path / "bf"), "m", "--layer", "0", "--out", str(tmp_path / "b.npy"))
    got = np.load(tmp_path / "b.npy")
    assert code == 0 and got.dtype == np.float32
    assert np.array_equal(got, expected_layer(store, "m", 0).astype(np.float32)) and got.max() > 65504


def test_verify_ok_then_corrupted(url: str, tmp_path) -> None:
    code, out, _ = _run("store", "verify", url)
    assert code == 0 and out.strip().endswith("16 shards read")
    shard = sorted((tmp_path / "store/models/m/hidden/0/c").glob("*/0"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    code, out, _ = _run("store", "verify", url)
    assert code == 1 and "PROBLEM models/m/hidden/0 shard 0" in out
    code, out, _ = _run("store", "verify", url, "--reset-damaged")
    assert code == 1 and "reset 1 damaged unit(s) of m" in out
    assert ActivationStore.open(url).model_info("m").units_done == 3


def test_rm(url: str) -> None:
    code, _, _ = _run("store", "rm", url, "m", "--yes")
    assert code == 0 and ActivationStore.open(url).models() == []


def test_rm_without_yes_and_without_a_terminal_is_refused_not_left_waiting(url: str) -> None:
    """`sleep 30 | hrsa store rm S m` asked on a pipe nobody answers, and waited for it to close."""
    import subprocess
    import sys

    waiting = subprocess.Popen([sys.executable, "-c", "from hrsa.cli import main; main()", "store", "rm", url, "m"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = waiting.communicate(timeout=60)  # stdin stays open: a prompt would wait the whole minute
    finally:
        waiting.kill()
    assert waiting.returncode == 2 and err.count("\n") == 1 and "Pass --yes" in err, err
    assert ActivationStore.open(url).models() == ["m"]


def _newer_format(url: str) -> None:
    meta_path = Path(url) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["hrsa"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))


ERROR_CASES = {
    "missing store": (["store", "ls", "{tmp}/absent"], "Got nothing there"),
    "unknown model": (["store", "info", "{url}", "nope"], "Expected a model of this store"),
    "layer out of range": (["store", "get", "{url}", "m", "--layer", "9", "--out", "{tmp}/o.npy"], "Expected a hidden state"),
    "layer out of range from the end": (["store", "get", "{url}", "m", "--layer", "-9", "--out", "{tmp}/o.npy"],
                                        "Expected a hidden state"),
    "escaping id": (["store", "get", "{url}", "../../etc", "--layer", "0", "--out", "{tmp}/o.npy"], "Expected a model id"),
    "escaping id on rm": (["store", "rm", "{url}", "..", "--yes"], "Expected a model id"),
    "bad token range": (["store", "get", "{url}", "m", "--layer", "0", "--tokens", "5:x", "--out", "{tmp}/o.npy"], "token range"),
    "empty token range": (["store", "get", "{url}", "m", "--layer", "0", "--tokens", "50:10", "--out", "{tmp}/o.npy"], "non-empty"),
    "token range past the end": (["store", "get", "{url}", "m", "--layer", "0", "--tokens", "0:99999", "--out",
                                  "{tmp}/o.npy"], "inside 0:1000"),
    "bad docs": (["store", "get", "{url}", "m", "--layer", "0", "--docs", "1,99", "--out", "{tmp}/o.npy"], "document indices"),
    "unknown model on rm": (["store", "rm", "{url}", "nope", "--yes"], "Expected a model"),
    "not a store": (["store", "ls", "{tmp}"], "Got other files there"),
    "out folder missing": (["store", "get", "{url}", "m", "--layer", "0", "--out", "{tmp}/no-dir/o.npy"],
                           "Expected an existing folder for --out"),
    "out folder is a file": (["store", "get", "{url}", "m", "--layer", "0", "--out", "{tmp}/afile/o.npy"],
                             "whose folder {tmp}/afile is a file"),
    "out folder below a file": (["store", "get", "{url}", "m", "--layer", "0", "--out", "{tmp}/afile/sub/o.npy"],
                                "whose folder {tmp}/afile is a file"),
    "reserved id on rm": (["store", "rm", "{url}", "zarr.json", "--yes"], "reserved by the store's layout"),
    "reserved id on info": (["store", "info", "{url}", "models"], "reserved by the store's layout"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_exit_2_and_change_nothing(case: str, url: str, tmp_path) -> None:
    args, message = ERROR_CASES[case]
    args, message = [a.format(url=url, tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    (tmp_path / "afile").write_text("a file where --out's folder should be\n")
    before = _tree_digest(Path(url))
    code, out, err = _run(*args)
    assert code == 2, (out, err)
    assert err.startswith("hrsa: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in out + err
    assert _tree_digest(Path(url)) == before
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "no-dir").exists()


@pytest.mark.parametrize("bad", ["..", "../..", "-", "zarr.json", "UNITS", "a b"])
def test_the_id_an_error_suggests_is_itself_valid(bad: str, url: str) -> None:
    from hrsa.store.ids import parse_id

    code, _, err = _run("store", "rm", url, bad, "--yes")
    assert code == 2 and err.count("\n") == 1 and ", e.g. " in err
    suggested = err.strip().rpartition(", e.g. ")[2].removesuffix(".")
    assert parse_id(suggested) == suggested


def test_newer_format_version_is_refused_by_every_verb(url: str, tmp_path) -> None:
    _newer_format(url)
    before = _tree_digest(Path(url))
    for args in (["ls", url], ["info", url, "m"], ["verify", url], ["rm", url, "m", "--yes"]):
        code, _, err = _run("store", *args)
        assert code == 2 and "Upgrade hrsa" in err and err.count("\n") == 1
    assert _tree_digest(Path(url)) == before


def test_console_entry_point_exits_2_without_traceback(tmp_path) -> None:
    exe = shutil.which("hrsa", path=str(Path(sys.executable).parent))
    assert exe, "the `hrsa` console script is installed beside the interpreter"
    done = subprocess.run([exe, "store", "ls", str(tmp_path / "absent")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_store_url_whose_storage_cannot_answer_is_one_line(tmp_path) -> None:
    """A bucket-less URL, or no credentials: the client's own error, named in one line with exit 2, not its
    traceback; nothing is created anywhere. In a process of its own: fsspec keeps a filesystem per options, and
    one without credentials would stay for the session's other S3 tests."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    for url, cause in (("s3://", "ParamValidationError"), ("s3://hrsa-no-bucket/store", "NoCredentialsError")):
        done = subprocess.run([sys.executable, "-m", "hrsa", "store", "ls", url], env=env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"Got {cause}" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("field,value", [("hidden_size", "32"), ("n_tokens", -5), ("corpus", 5),
                                         ("hidden_states", [0, 99]), ("source", "weights")])
def test_edited_model_attributes_are_one_line_in_every_verb(url: str, field: str, value: Any) -> None:
    """`"hidden_size": "32"` failed `hrsa store verify` on a TypeError, `"corpus": 5` `hrsa store ls` on rich's
    NotRenderableError: attributes of the wrong type read as a model without valid attributes, in one line."""
    meta_path = Path(url) / "models" / "m" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["hrsa"][field] = value
    meta_path.write_text(json.dumps(meta))
    before = _tree_digest(Path(url))
    for args in (["store", "verify", url], ["store", "ls", url], ["store", "info", url, "m"]):
        code, out, err = _run(*args)
        assert "Traceback" not in out + err and code in (0, 1, 2), (args, code, out, err)
        assert err.count("\n") <= 1, (args, err)
    code, out, err = _run("store", "info", url, "m")
    assert code == 2 and "without valid attributes" in err and "or they were edited" in err, err
    assert _tree_digest(Path(url)) == before


# --- --out never replaces what is not a regular file, nor writes inside a store -------------------------------------


def _special_outs(tmp_path: Path) -> list[Path]:
    """A FIFO, and (as root) a character device node, both made here: never a real device file."""
    import os
    import stat

    specials = tmp_path / "specials"
    specials.mkdir()
    os.mkfifo(specials / "fifo")
    outs = [specials / "fifo"]
    if os.geteuid() == 0:
        os.mknod(specials / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        outs.append(specials / "chardev")
    link = specials / "link-to-fifo.npy"
    link.symlink_to(specials / "fifo")
    return [*outs, link]


def test_get_refuses_an_out_that_is_not_a_regular_file(url: str, tmp_path) -> None:
    """`--out` over a FIFO or a device node replaced it with a regular file (os.replace takes anything)."""
    import stat

    for out in _special_outs(tmp_path):
        kind = out.lstat().st_mode
        code, stdout, err = _run("store", "get", url, "m", "--layer", "1", "--out", str(out))
        assert code == 2 and err.startswith("hrsa: error: ") and err.count("\n") == 1, (out, stdout, err)
        assert "--out" in err and "regular file" in err, err
        assert out.lstat().st_mode == kind and not stat.S_ISREG(out.stat().st_mode)
    assert not [p for p in (tmp_path / "specials").iterdir() if p.name.startswith(".hrsa-")]


@pytest.mark.parametrize("where", ["zarr.json", "models/m/zarr.json", "models/m/done/0", "new.npy",
                                   "corpora/new.npy", "link/zarr.json"])
def test_get_refuses_an_out_inside_a_store(where: str, url: str, tmp_path) -> None:
    """`--out STORE/models/m/zarr.json` overwrote the model's metadata with a .npy: every verb then failed."""
    (tmp_path / "link").symlink_to(Path(url) / "models" / "m")
    target = tmp_path / where if where.startswith("link/") else Path(url) / where
    before = _tree_digest(Path(url))
    code, stdout, err = _run("store", "get", url, "m", "--layer", "1", "--out", str(target))
    assert code == 2 and err.startswith("hrsa: error: ") and err.count("\n") == 1, (stdout, err)
    assert "inside the hrsa store" in err and "--out" in err, err
    assert _tree_digest(Path(url)) == before
    code, _, _ = _run("store", "verify", url)
    assert code == 0


def test_get_still_overwrites_a_regular_file(url: str, tmp_path, filled_store: ActivationStore) -> None:
    out = tmp_path / "x.npy"
    out.write_bytes(b"an earlier file")
    code, _, err = _run("store", "get", url, "m", "--layer", "1", "--out", str(out))
    assert code == 0, err
    assert np.array_equal(np.load(out), expected_layer(filled_store, "m", 1))


@pytest.mark.parametrize("flag", ["--docs", "--tokens"])
@pytest.mark.parametrize("value", ["", " "])
def test_get_refuses_an_empty_selection_flag(flag: str, value: str, url: str, tmp_path) -> None:
    """`--docs "$UNSET"` wrote every token, while `--docs ,` was refused."""
    out = tmp_path / "x.npy"
    code, stdout, err = _run("store", "get", url, "m", "--layer", "1", flag, value, "--out", str(out))
    assert code == 2 and err.startswith("hrsa: error: ") and err.count("\n") == 1, (stdout, err)
    assert not out.exists()


def test_ls_notes_an_unreadable_corpus_and_a_model_whose_corpus_is_gone(tmp_path) -> None:
    """A corpus whose metadata does not read vanished from `store ls`, and its models had no note."""
    from hrsa.store.testing import make_table

    url = str(tmp_path / "s")
    store = ActivationStore.open(url, mode="a")
    broken = store.write_corpus(make_table((10, 10)), tokenizer={"name": "tok", "fingerprint": "fp"})
    gone = store.write_corpus(make_table((10, 12)), tokenizer={"name": "tok", "fingerprint": "fp"})
    store.create_model("on-broken", corpus=broken, n_hidden_states=1, hidden_size=4, dtype="float32")
    store.create_model("on-gone", corpus=gone, n_hidden_states=1, hidden_size=4, dtype="float32")
    (tmp_path / "s" / "corpora" / broken / "zarr.json").write_text("garbage\n")
    shutil.rmtree(tmp_path / "s" / "corpora" / gone)
    code, out, err = _run("store", "ls", url)
    assert code == 0, (out, err)
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert any(broken in line and "metadata" in line and "hrsa store verify" in line for line in notes), out
    assert any("on-broken" in line and broken in line for line in notes), out
    assert any("on-gone" in line and gone in line and "absent" in line for line in notes), out


# -- result records: listed by `store ls`, deleted by `store rm --results` -------------------------------------------
def _record(url: str, run_id: str, a: str = "m", b: str = "m", *, complete: bool = True) -> None:
    """A result record as `hrsa analyze` leaves it: arrays first, its document (attributes) last."""
    store = ActivationStore.open(url, mode="r+")
    group = store.create_results(run_id)
    group.create_array("cka", data=np.eye(2))
    if complete:
        group.attrs["hrsa"] = {"schema": "hrsa.analyze/1", "run_id": run_id, "a": a, "b": b,
                               "created": "2026-12-04T03:00:00Z", "metrics": {"cka": {}}}


def test_ls_lists_result_records_with_their_pair_and_state(url: str) -> None:
    """A result record took its run id for good, and no verb showed it: `analyze --run-id` refused an id the user
    could not see ("delete that record first") and records of every pipeline re-run piled up unseen."""
    _record(url, "m--m--one")
    _record(url, "cut-short", complete=False)
    code, out, _ = _run("store", "ls", url)
    assert code == 0, out
    results = out[out.index("results"):]
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in results.splitlines() if line.startswith("│")}
    assert cells["m--m--one"] == ["m", "m", "2026-12-04T03:00:00Z"], cells
    assert cells["cut-short"][:2] == ["", ""] and "incomplete" in cells["cut-short"][2], cells


def test_rm_results_deletes_one_record_and_nothing_else(url: str) -> None:
    _record(url, "keep")
    _record(url, "drop")
    before = ActivationStore.open(url).model_info("m")
    code, out, err = _run("store", "rm", url, "drop", "--results", "--yes")
    assert code == 0 and "deleted result record drop" in out, out + err
    after = ActivationStore.open(url)
    assert after.results_ids() == ["keep"] and after.models() == ["m"] and after.model_info("m") == before
    assert np.array_equal(after.hidden_state("m", 1).compute(), expected_layer(after, "m", 1))


def test_rm_of_a_result_id_without_results_names_the_flag_and_deletes_nothing(url: str, tmp_path) -> None:
    _record(url, "a-run")
    before = _tree_digest(Path(url))
    code, out, err = _run("store", "rm", url, "a-run", "--yes")
    assert code == 2 and err.count("\n") == 1 and "--results" in err, out + err
    code, out, err = _run("store", "rm", url, "no-such-run", "--results", "--yes")
    assert code == 2 and err.count("\n") == 1 and "a-run" in err, out + err  # names the records there are
    assert _tree_digest(Path(url)) == before


@pytest.mark.parametrize(("args", "names"), [
    (["store", "get", "S", "m", "--layer", "abc"], ["--layer", "abc", "store get --help"]),
    (["store", "ls"], ["URL", "store ls --help"]),
    (["analyze", "--compute-dtype", "float16"], ["float16", "analyze --help"]),
    (["--bogus"], ["--bogus", " --help"]),
    (["no-such-verb"], ["no-such-verb", " --help"]),
    (["run", "no-such.yaml"], ["no-such.yaml", "run --help"]),
])
def test_usage_errors_are_one_line_naming_the_setting_and_help(args: list[str], names: list[str]) -> None:
    """Click printed three lines (the usage, a hint, the error) where every other refusal is one."""
    code, out, err = _run(*args)
    assert code == 2 and err.startswith("hrsa: error: ") and err.count("\n") == 1, (out, err)
    assert all(name in err for name in names), err


@pytest.mark.parametrize("args", [[], ["store"]])
def test_a_group_alone_prints_its_help_not_an_error(args: list[str]) -> None:
    code, out, err = _run(*args)
    assert "hrsa: error" not in out + err and "Usage:" in out + err and "Commands:" in out + err, (out, err)


def test_a_path_the_system_refuses_is_one_line_and_exit_2(url: str, monkeypatch) -> None:
    """A folder that cannot be made there (/proc refuses new folders) was an OSError traceback, exit 1; so was a
    read-only filesystem wherever hrsa could not tell before writing."""
    import errno

    target = "/proc/hrsa-no-such-folder/layer.npy"
    code, out, err = _run("store", "get", url, "m", "--layer", "1", "--out", target)
    assert code == 2 and err.startswith("hrsa: error: ") and err.count("\n") == 1 and "/proc/hrsa-no-such-folder" in err, (out, err)
    import hrsa.store.cli as store_cli

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/layer.npy")

    monkeypatch.setattr(store_cli, "atomic_file", read_only, raising=False)
    monkeypatch.setattr("hrsa.store.local_files.atomic_file", read_only)
    code, out, err = _run("store", "get", url, "m", "--layer", "1", "--out", str(Path(url).parent / "x.npy"))
    assert code == 2 and err.count("\n") == 1 and "read-only filesystem" in err and "/mnt/ro/layer.npy" in err, (out, err)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "an-array"])
def test_a_record_whose_metadata_is_damaged_is_named_and_deleted_and_blocks_nothing(url: str, damage: str) -> None:
    """Listing the records read every record's metadata: one cut short made `store ls`, `store rm` of a model and of
    the record itself (the fix it would name) and analyses' writes tracebacks, while `store verify` said ok."""
    _record(url, "keep")
    _record(url, "broken")
    path = Path(url) / "results" / "broken" / "zarr.json"
    text = path.read_text()
    path.write_text({"truncated": text[:100], "garbage": "\x00garbage",
                     "an-array": json.dumps({"zarr_format": 3, "node_type": "array"})}[damage])
    code, out, err = _run("store", "ls", url)
    assert code == 0 and "broken" in out and "keep" in out, out + err
    assert "damaged" in out[out.index("results"):] and "--results" in out, out
    code, out, err = _run("store", "verify", url)
    assert code != 0 and "results/broken" in out + err and "--results" in out + err, out + err
    code, out, err = _run("store", "rm", url, "broken", "--results", "--yes")
    assert code == 0 and "deleted result record broken" in out, out + err
    assert ActivationStore.open(url).results_ids() == ["keep"] and not path.parent.exists()
    _record(url, "broken-again")
    (Path(url) / "results" / "broken-again" / "zarr.json").write_text("{")
    code, out, err = _run("store", "rm", url, "m", "--yes")
    assert code == 0 and ActivationStore.open(url).models() == [], out + err


@pytest.mark.parametrize("name", ["s", "models", "done"])
def test_a_store_named_by_a_relative_path_reads_its_units_and_claims(name: str, tmp_path, monkeypatch) -> None:
    """zarr's LocalStore lists keys relative to its root with str.replace of "<root>/" anywhere in the key: a store
    opened as a relative path ("s", "models", "done") lost that text inside every key ("models/m/done/0" listed as
    "modelm/done/0" for "s"), so `store ls` and `store verify` read 0 units done, analyses refused the model as
    incomplete, and `store rm` saw no extraction's claims. Relative and absolute paths must read alike."""
    from hrsa.store.units import live_claims
    from hrsa.store.testing import fill_model, new_model

    monkeypatch.chdir(tmp_path)
    store = ActivationStore.open(name, mode="a")
    new_model(store, "m")
    fill_model(store, "m")
    for url in (name, f"./{name}", str(tmp_path / name)):
        opened = ActivationStore.open(url)
        assert opened.model_info("m").complete, url
        code, out, err = _run("store", "ls", url)
        assert code == 0 and "4/4" in out and "incomplete" not in out, (url, out, err)
        code, out, err = _run("store", "verify", url)
        assert code == 0, (url, out, err)
    new_model(store, "n")  # an extraction holding unit 0 of model n: rm must see its claim
    writer = ActivationStore.open(name, mode="r+").writer("n")
    with writer.claimed(writer.units()[0]) as claim:
        assert claim is not None
        assert [c.unit for c in live_claims(store._root.store, "models/n")] == [0]
        code, _, err = _run("store", "rm", name, "n", "--yes")
        assert code == 2 and "live claims" in err, err


def test_rm_deletes_a_model_when_the_results_group_is_damaged(url: str) -> None:
    """`store rm` counts the result records naming the model, a report only: a damaged results/zarr.json (which has
    nothing to do with the model) refused the deletion with exit 1, as it never did before it counted them."""
    (Path(url) / "results" / "zarr.json").write_text("not json")
    code, out, err = _run("store", "rm", url, "m", "--yes")
    assert code == 0 and "deleted m" in out, (out, err)
    assert "result records" in out and "hrsa store verify" in out  # said, not counted
    assert ActivationStore.open(url).models() == []


@pytest.mark.parametrize("damage", ["dtype", "gone"])
def test_ls_notes_a_model_whose_hidden_state_metadata_is_damaged(url: str, damage: str) -> None:
    """A hidden state's array metadata edited (its data type) or deleted: reads and verify refuse the model, but
    `store ls` listed it 4/4 done, as if whole."""
    meta = Path(url) / "models" / "m" / "hidden" / "1" / "zarr.json"
    if damage == "gone":
        meta.unlink()
    else:
        doc = json.loads(meta.read_text())
        doc["data_type"] = "float64"
        meta.write_text(json.dumps(doc))
    code, out, err = _run("store", "ls", url)
    assert code == 0, (out, err)
    notes = [line for line in out.splitlines() if line.startswith("note:") and " m " in f" {line} "]
    assert len(notes) == 1 and "damaged" in notes[0] and "hidden/1" in notes[0] and "hrsa store verify" in notes[0], out


def test_ls_notes_nothing_of_whole_models(url: str) -> None:
    code, out, _ = _run("store", "ls", url)
    assert code == 0 and "note:" not in out, out


def test_ls_prints_sources_and_record_fields_verbatim(tmp_path) -> None:
    """Cells were read as rich markup: a corpus file under a folder named `data [v2]` was listed as `data `, and a
    result record whose document (edited, or of another tool) holds `[/]` made `store ls` a MarkupError traceback."""
    from hrsa.store.testing import make_table

    url = str(tmp_path / "s")
    store = ActivationStore.open(url, mode="a")
    source = "/data [v2]/[bold]mail.jsonl"
    store.write_corpus(make_table((10, 10)), tokenizer={"name": "tok [fast]", "fingerprint": "fp"}, source=source)
    group = store.create_results("edited")
    group.attrs["hrsa"] = {"run_id": "edited", "a": "[/]", "b": "[red]b", "created": "[link=x]now"}
    code, out, err = _run("store", "ls", url)
    assert code == 0, out + err
    assert source in out and "tok [fast]" in out, out
    assert all(cell in out for cell in ("[/]", "[red]b", "[link=x]now")), out


def test_ctrl_c_in_any_verb_is_one_line_and_exit_130(url: str, monkeypatch) -> None:
    """`hrsa eval` (any verb but train and run) printed Click's "Aborted!" and exited 1 on Ctrl-C, as a failure."""
    import hrsa.store.cli as store_cli

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_cli, "_results_table", interrupted)
    code, out, err = _run("store", "ls", url)
    assert code == 130 and err == "hrsa: interrupted.\n" and "Aborted" not in out + err, (out, err)
