"""The command line on bad files and paths: one line naming the problem and exit 2 (1: no valid prompt),
outputs checked before the work and written whole or not at all (issue 15, cases 6-8)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from effroll.cli import main
from effroll.engine.sampling import derive_seed
from effroll.llm import LLM

from test_cli_generate import save_tiny_checkpoint, write_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "target", seed=0)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, code=2, *needles):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("effroll: error:")]
    assert len(err) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def damaged_copy(src, dst, mutate):
    import shutil

    shutil.copytree(src, dst)
    mutate(dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "config-key", "config-list", "config-json"])
def test_damaged_checkpoints_are_one_line_errors(ckpt, tmp_path, damage):
    def mutate(d):
        st = d / "model.safetensors"
        cfg = d / "config.json"
        if damage == "truncated":
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        elif damage == "empty":
            st.write_bytes(b"")
        elif damage == "config-key":
            c = json.loads(cfg.read_text())
            del c["hidden_size"]
            cfg.write_text(json.dumps(c))
        elif damage == "config-list":
            cfg.write_text("[1, 2]")
        else:
            cfg.write_text("{not json")

    bad = damaged_copy(ckpt, tmp_path / "bad", mutate)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5]}])
    needle = {"truncated": "cannot read weights file", "empty": "cannot read weights file",
              "config-key": "lacks the required key 'hidden_size'", "config-list": "must hold a JSON object",
              "config-json": "is not valid JSON"}[damage]
    one_line_error(invoke("generate", "--model", bad, "--prompts", prompts, "--out", tmp_path / "o.jsonl"), 2, needle)
    # as a drafter, and in verify
    one_line_error(invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                          "--mode", "sd", "--drafter", bad), 2, needle)
    one_line_error(invoke("verify", "--model", ckpt, "--drafter", bad, "--samples", "100"), 2, needle)
    one_line_error(invoke("verify", "--model", bad, "--samples", "100"), 2, needle)
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_paths_and_devices_are_one_line_errors(ckpt, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5]}])
    (tmp_path / "afile").write_text("x")
    one_line_error(invoke("generate", "--model", ckpt, "--prompts", tmp_path, "--out", tmp_path / "o.jsonl"), 2,
                   "is not a file")
    if not torch.cuda.is_available():
        one_line_error(invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                              "--device", "cuda"), 2, "sees no CUDA device")
    one_line_error(invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
                          "--device", "tpu"), 2, "device 'tpu'")
    # an --out that cannot be written (its parent is a file) fails before any work
    one_line_error(invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", tmp_path / "afile" / "o.jsonl"),
                   2, "--out", "not writable")
    one_line_error(invoke("tune", "--model", ckpt, "--out", tmp_path / "afile" / "p.json", "--budget-s", "1"),
                   2, "--out", "not writable")
    res = invoke("tune", "--model", ckpt, "--out", tmp_path, "--budget-s", "1")  # click's own usage error
    assert res.exit_code == 2 and "is a directory" in res.output


def test_out_is_written_whole_or_not_at_all(ckpt, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5]}, {"prompt_token_ids": [1, 6]}])
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    real = json.dumps
    calls = {"n": 0}

    def failing_dumps(obj, *a, **kw):
        if isinstance(obj, dict) and "token_ids" in obj:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full (injected)")
        return real(obj, *a, **kw)

    monkeypatch.setattr(json, "dumps", failing_dumps)
    one_line_error(invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", out, "--max-tokens", "4"), 2,
                   "disk full")
    monkeypatch.undo()
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]
    res = invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", out, "--max-tokens", "4")
    assert res.exit_code == 0 and len(out.read_text().splitlines()) == 2


def test_generate_exits_1_when_no_prompt_is_valid(ckpt, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 500]}, {"prompt_token_ids": [999]}])
    res = invoke("generate", "--model", ckpt, "--prompts", prompts, "--out", tmp_path / "o.jsonl")
    assert res.exit_code == 1, res.output
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [ln["finish_reason"] for ln in lines] == ["error", "error"] and "not an int in [0, 64)" in lines[0]["error"]


def test_cli_and_library_give_the_same_tokens_for_large_seeds(ckpt, tmp_path):
    prompts = [[1, 5, 6], [1, 9]]
    path = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": p} for p in prompts])
    res = invoke("generate", "--model", ckpt, "--prompts", path, "--out", tmp_path / "o.jsonl", "--seed",
                 "1000000000", "--n", "2", "--max-tokens", "6", "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    llm = LLM(str(ckpt), recipe=None, dtype="fp32")
    want = [c.token_ids for i, p in enumerate(prompts)
            for c in llm.generate([p], {"n": 2, "max_tokens": 6, "seed": derive_seed(10**9, i)})[0].outputs]
    assert [ln["token_ids"] for ln in lines] == want
