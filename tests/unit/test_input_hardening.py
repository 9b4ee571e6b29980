"""Issue 18, items 3 and 4, at the worker's door: local inputs stay inside the allowed roots once
every symlink under them is resolved (``lorp.paths.check_confined``), and a model whose
headers or config are malformed, or whose config claims more than the worker accepts, ends its
job with a stable code before anything is loaded (``JobRunner._check_memory``).

The runner tests drive ``JobRunner.run`` with in-memory stand-ins for Redis and the object store
(no services), a fake pipeline that fails the test if it is ever reached, and real ``Settings``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, cast

import pytest

from jobcore.config import Settings
from jobcore.spec import JobState
from jobcore.store import JobRecord
from lorp.errors import InvalidInputError, ModelLoadError
from lorp.paths import check_confined
from tests.tiny_models import TINY_TEXT
from worker.runner import JobRunner

# -- check_confined (pure) ------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """``root/model`` (config + tokenizer files), ``root/calib.txt``, and ``outside/secret.txt``
    next to the root."""
    root = tmp_path / "root"
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")
    (root / "calib.txt").write_text("calibration text")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("acme's private notes")
    return {"root": root, "model": model, "outside": outside, "secret": outside / "secret.txt"}


def _refused(path: Path, roots: list[Path], fragment: str, secret: Path) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as info:
        check_confined(path, roots)
    assert info.value.code == "invalid_input"
    assert str(secret) not in str(info.value)  # never says where a link points


def test_symlinked_tokenizer_leaving_the_root_is_refused(layout: dict[str, Path]) -> None:
    """The finding: tokenizer.json -> a file outside the root was read."""
    (layout["model"] / "tokenizer.json").symlink_to(layout["secret"])
    _refused(
        layout["model"], [layout["root"]], "'tokenizer.json' resolves outside", layout["secret"]
    )


def test_relative_symlink_leaving_the_root_is_refused(layout: dict[str, Path]) -> None:
    (layout["model"] / "tokenizer.json").symlink_to(Path("../../outside/secret.txt"))
    _refused(layout["model"], [layout["root"]], "'tokenizer.json'", layout["secret"])


def test_nested_file_and_linked_folder_leaving_the_root_are_refused(
    layout: dict[str, Path],
) -> None:
    deeper = layout["model"] / "sub" / "deeper"
    deeper.mkdir(parents=True)
    (deeper / "weights.safetensors").symlink_to(layout["secret"])
    _refused(
        layout["model"], [layout["root"]], "'sub/deeper/weights.safetensors'", layout["secret"]
    )
    (deeper / "weights.safetensors").unlink()
    (layout["model"] / "extra").symlink_to(layout["outside"], target_is_directory=True)
    _refused(layout["model"], [layout["root"]], "'extra' resolves outside", layout["secret"])


def test_linked_folder_inside_the_root_is_walked_too(layout: dict[str, Path]) -> None:
    """A folder link that stays inside is followed: what it holds is checked as well."""
    other = layout["root"] / "other"
    other.mkdir()
    (other / "ok.json").write_text("{}")
    (layout["model"] / "extra").symlink_to(other, target_is_directory=True)
    assert check_confined(layout["model"], [layout["root"]]) == layout["model"].resolve()
    (other / "evil.json").symlink_to(layout["secret"])
    _refused(layout["model"], [layout["root"]], "'extra/evil.json'", layout["secret"])


def test_links_that_stay_inside_are_accepted(layout: dict[str, Path]) -> None:
    """HF-cache style layouts (files linked to blobs elsewhere under the root) still work; a
    folder link back to an ancestor (a loop) ends."""
    blobs = layout["root"] / "blobs"
    blobs.mkdir()
    (blobs / "abc123").write_text("{}")
    (layout["model"] / "tokenizer.json").symlink_to(blobs / "abc123")
    (layout["model"] / "loop").symlink_to(layout["model"], target_is_directory=True)
    assert check_confined(str(layout["model"]), [str(layout["root"])]) == layout["model"].resolve()


def test_broken_links_and_special_files_are_refused(layout: dict[str, Path]) -> None:
    (layout["model"] / "tokenizer.json").symlink_to(layout["root"] / "missing.json")
    _refused(layout["model"], [layout["root"]], "broken link", layout["secret"])
    (layout["model"] / "tokenizer.json").unlink()
    os.mkfifo(layout["model"] / "tokenizer.json")  # reading it would block the worker
    _refused(layout["model"], [layout["root"]], "not a regular file", layout["secret"])
    os.mkfifo(layout["root"] / "calib.fifo")
    _refused(
        layout["root"] / "calib.fifo", [layout["root"]], "not a regular file", layout["secret"]
    )


def test_the_path_itself_and_text_files(layout: dict[str, Path], tmp_path: Path) -> None:
    root = layout["root"]
    assert check_confined(root / "calib.txt", [root]) == (root / "calib.txt").resolve()
    (root / "notes.txt").symlink_to(layout["secret"])
    _refused(root / "notes.txt", [root], "not under an allowed local root", layout["secret"])
    (root / "elsewhere").symlink_to(layout["outside"], target_is_directory=True)
    _refused(root / "elsewhere", [root], "not under an allowed local root", layout["secret"])
    _refused(root / "calib.txt", [], "not under an allowed local root", layout["secret"])
    missing = root / "not-there"
    assert check_confined(missing, [root]) == missing.resolve()  # the loader reports it
    # A root given through a link is resolved like the paths are.
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    assert check_confined(layout["model"], [tmp_path / "root-link"]) == layout["model"].resolve()


def test_too_many_entries_are_refused(layout: dict[str, Path]) -> None:
    for i in range(5):
        (layout["model"] / f"f{i}").write_text("")
    with pytest.raises(InvalidInputError, match="more than 4 files"):
        check_confined(layout["model"], [layout["root"]], max_entries=4)


# -- JobRunner.run with in-memory stand-ins ------------------------------------------------


class _Store:
    """The JobStore calls ``JobRunner.run`` makes, in memory; ``finished`` records the end."""

    def __init__(self, rec: JobRecord) -> None:
        self.rec = rec
        self.finished: tuple[JobState, dict[str, Any]] | None = None

    def get_any(self, job_id: str) -> JobRecord | None:
        return self.rec if job_id == self.rec.id else None

    def acquire_lock(self, job_id: str, token: str, ttl_ms: int) -> bool:
        return True

    def record_job(self, state: str, timings: Any) -> None:
        self.recorded = (state, dict(timings))

    def lock_holder(self, job_id: str) -> str | None:
        return None

    def refresh_lock(self, job_id: str, token: str, ttl_ms: int) -> bool:
        return True

    def release_lock(self, job_id: str, token: str) -> bool:
        return True

    def start(self, rec: JobRecord, *, max_running: int | None = None) -> bool:
        rec.state = JobState.running
        rec.attempts += 1
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return False

    def set_progress(self, rec: JobRecord, stage: str, fraction: float, message: str) -> None:
        pass

    def finish(self, rec: JobRecord, state: JobState, **kw: Any) -> None:
        rec.state = state
        self.finished = (state, kw)


class _Storage:
    def delete_prefix(self, prefix: str, *args: Any, **kwargs: Any) -> int:
        return 0


def _never(*args: Any, **kwargs: Any) -> Any:
    pytest.fail("the pipeline ran: the input should have been refused before loading")


@pytest.fixture
def runner_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``runner_for(spec, max_model_bytes=None) -> (state, error code, message)``: one job run
    by a JobRunner whose only local root is ``tmp_path/root``."""
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)

    def run(spec: dict[str, Any], max_model_bytes: int | None = None) -> tuple[str, str, str]:
        settings = Settings(
            s3_access_key_id="test-access",  # type: ignore[arg-type]
            s3_secret_access_key="test-secret",  # type: ignore[arg-type]
            s3_bucket="lorp-test",
            api_keys={"acme-key-0123456789": "acme"},
            local_roots=[root],
            work_dir=tmp_path / "work",
            max_model_bytes=max_model_bytes,
        )
        rec = JobRecord(
            id="a" * 32,
            tenant="acme",
            seq=1,
            state=JobState.queued,
            created_at="2025-01-01T00:00:00Z",
            spec={"budget": {"blocks": 1}, **spec},
            fingerprint="",
        )
        store = _Store(rec)
        runner = JobRunner(
            settings, cast(Any, store), cast(Any, _Storage()), pipeline=_never, lock_ttl_ms=60_000
        )
        assert runner.run(rec.id) == "failed"
        assert store.finished is not None
        state, kw = store.finished
        error = kw["error"]
        return state.value, error.code, error.message

    return run


def _model_dir(tiny_dir: Path, folder: Path, **config_changes: Any) -> Path:
    """A copy of the tiny checkpoint's files (config edited) in ``folder``."""
    folder.mkdir(parents=True)
    for item in tiny_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _calib(root: Path) -> str:
    (root / "calib.txt").write_text(TINY_TEXT)
    return str(root / "calib.txt")


@pytest.mark.parametrize("limit", [None, 10**12])
def test_malformed_safetensors_header_fails_the_job_as_model_load_failed(
    tiny_dir: Path, tmp_path: Path, runner_for: Any, limit: int | None
) -> None:
    """Was ``internal`` ("AttributeError: 'list' object has no attribute 'items'") with a limit,
    and reached the loader without one."""
    model = _model_dir(tiny_dir, tmp_path / "root" / "model")
    header = json.dumps([1, 2, 3]).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    state, code, message = runner_for(
        {"model": str(model), "calibration": _calib(tmp_path / "root")}, limit
    )
    assert (state, code) == ("failed", "model_load_failed")
    assert message.startswith("model.safetensors: safetensors header is not a JSON object")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_claiming_huge_dims_is_refused_before_loading(
    tiny_dir: Path, tmp_path: Path, runner_for: Any, dtype: str
) -> None:
    """Tiny weights (kilobytes) under a limit of 1 GB, but a config claiming a ~270 B model."""
    model = _model_dir(
        tiny_dir,
        tmp_path / "root" / "model",
        hidden_size=16384,
        intermediate_size=65536,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=256_000,
    )
    spec = {"model": str(model), "calibration": _calib(tmp_path / "root"), "dtype": dtype}
    state, code, message = runner_for(spec, 10**9)
    assert (state, code) == ("failed", "model_too_large")
    assert f"in {dtype}" in message and "at most 1000000000 bytes" in message


def test_absurd_config_fails_even_without_a_limit(
    tiny_dir: Path, tmp_path: Path, runner_for: Any
) -> None:
    model = _model_dir(tiny_dir, tmp_path / "root" / "model", num_hidden_layers=-6)
    spec = {"model": str(model), "calibration": _calib(tmp_path / "root")}
    state, code, message = runner_for(spec, None)
    assert (state, code) == ("failed", "model_load_failed")
    assert message == "config.json: num_hidden_layers must be a positive integer, got -6"


def test_symlinked_tokenizer_out_of_the_root_fails_the_job(
    tiny_dir: Path, tmp_path: Path, runner_for: Any
) -> None:
    """Issue 18 item 4 at the worker: the model folder is inside the root, its tokenizer.json
    points outside; the job fails ``invalid_input`` before anything is read."""
    model = _model_dir(tiny_dir, tmp_path / "root" / "model")
    secret = tmp_path / "outside" / "tokenizer.json"
    secret.parent.mkdir()
    secret.write_bytes((model / "tokenizer.json").read_bytes())
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    spec = {"model": str(model), "calibration": _calib(tmp_path / "root")}
    state, code, message = runner_for(spec, None)
    assert (state, code) == ("failed", "invalid_input")
    assert "'tokenizer.json' resolves outside the allowed local roots" in message
    assert str(secret.parent) not in message


def test_calibration_fifo_in_the_root_fails_the_job(
    tiny_dir: Path, tmp_path: Path, runner_for: Any
) -> None:
    model = _model_dir(tiny_dir, tmp_path / "root" / "model")
    fifo = tmp_path / "root" / "calib.txt"
    os.mkfifo(fifo)
    state, code, message = runner_for({"model": str(model), "calibration": str(fifo)}, None)
    assert (state, code) == ("failed", "invalid_input")
    assert "not a regular file" in message


def test_gguf_file_with_a_sibling_leaving_the_root_fails_the_job(
    tmp_path: Path, runner_for: Any
) -> None:
    """For a ``.gguf`` file transformers reads the files beside it too (tokenizer_config.json,
    generation_config.json ...): the GGUF's folder is confined like a model folder."""
    import numpy as np
    from gguf import GGUFWriter

    folder = tmp_path / "root" / "gguf"
    folder.mkdir(parents=True)
    writer = GGUFWriter(str(folder / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    secret = tmp_path / "outside" / "tokenizer_config.json"
    secret.parent.mkdir()
    secret.write_text("{}")
    (folder / "tokenizer_config.json").symlink_to(secret)
    spec = {"model": str(folder / "m.gguf"), "calibration": _calib(tmp_path / "root")}
    state, code, message = runner_for(spec, None)
    assert (state, code) == ("failed", "invalid_input")
    assert "'tokenizer_config.json' resolves outside the allowed local roots" in message
    assert str(secret.parent) not in message


def test_failure_messages_name_inputs_as_submitted(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 6: an error that names the worker's copies of the inputs (a corpus file,
    the job's work dir) reaches the user with the names they submitted instead."""
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    root = tmp_path / "root"
    model = _model_dir(tiny_dir, root / "model")
    corpus = tmp_path / "corpora" / "handbook.txt"
    corpus.parent.mkdir()
    corpus.write_text(TINY_TEXT)
    work = tmp_path / "work"
    settings = Settings(
        s3_access_key_id="test-access",  # type: ignore[arg-type]
        s3_secret_access_key="test-secret",  # type: ignore[arg-type]
        s3_bucket="lorp-test",
        api_keys={"acme-key-0123456789": "acme"},
        local_roots=[root],
        corpora={"handbook": corpus},
        work_dir=work,
    )
    job_id = "b" * 32

    def failing(model_path: str, calibration: Path, out: Path, *args: Any, **kw: Any) -> Any:
        assert Path(calibration) == corpus.resolve() and Path(out).is_relative_to(work)
        raise ModelLoadError(f"cannot read {calibration} while writing {out}/model")

    rec = JobRecord(
        id=job_id,
        tenant="acme",
        seq=1,
        state=JobState.queued,
        created_at="2025-01-01T00:00:00Z",
        spec={"budget": {"blocks": 1}, "model": str(model), "calibration": "corpus:handbook"},
        fingerprint="",
    )
    store = _Store(rec)
    runner = JobRunner(
        settings, cast(Any, store), cast(Any, _Storage()), pipeline=failing, lock_ttl_ms=60_000
    )
    assert runner.run(job_id) == "failed"
    assert store.finished is not None
    error = store.finished[1]["error"]
    assert error.code == "model_load_failed"
    assert error.message == "cannot read corpus:handbook while writing <job work dir>/out/model"
    assert str(tmp_path) not in error.message
