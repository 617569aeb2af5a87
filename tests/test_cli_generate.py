"""`effroll generate` end to end on a tiny checkpoint without tokenizer files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from effroll.checkpoints import load_model
from effroll.cli import main


def save_tiny_checkpoint(path, seed=0, noise=0.0, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(cfg)
    if noise:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * noise * p.std())
    m.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = save_tiny_checkpoint(root / "target", seed=0)
    # same init seed + small noise: a drafter that is close to, but not, the target
    drafter = save_tiny_checkpoint(root / "drafter", seed=0, noise=0.2)
    return target, drafter


def write_prompts(path, lines):
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_generate_ar_and_sd_greedy_agree(ckpts, tmp_path):
    target, drafter = ckpts
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 9]}])
    r = CliRunner()
    res_ar = r.invoke(main, ["generate", "--model", str(target), "--prompts", str(prompts), "--out",
                             str(tmp_path / "ar.jsonl"), "--temperature", "0", "--max-tokens", "12", "--dtype", "fp32"])
    assert res_ar.exit_code == 0, res_ar.output
    res_sd = r.invoke(main, ["generate", "--model", str(target), "--prompts", str(prompts), "--out",
                             str(tmp_path / "sd.jsonl"), "--drafter", str(drafter), "--mode", "sd", "--k", "3",
                             "--temperature", "0", "--max-tokens", "12", "--dtype", "fp32"])
    assert res_sd.exit_code == 0, res_sd.output
    ar = [json.loads(x) for x in (tmp_path / "ar.jsonl").read_text().splitlines()]
    sd = [json.loads(x) for x in (tmp_path / "sd.jsonl").read_text().splitlines()]
    assert len(ar) == 2 and [a["token_ids"] for a in ar] == [s["token_ids"] for s in sd]
    for line in sd:
        assert set(line) >= {"token_ids", "logprobs", "finish_reason"}
        assert len(line["logprobs"]) == len(line["token_ids"]) and line["finish_reason"] in ("stop", "length")


def test_generate_n_samples_and_seed(ckpts, tmp_path):
    target, _ = ckpts
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5, 6]}])
    outs = []
    for run in range(2):
        out = tmp_path / f"o{run}.jsonl"
        res = CliRunner().invoke(main, ["generate", "--model", str(target), "--prompts", str(prompts), "--out", str(out),
                                        "--n", "4", "--seed", "3", "--max-tokens", "8", "--dtype", "fp32"])
        assert res.exit_code == 0, res.output
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    assert len(outs[0]) == 4 and [o["sample_index"] for o in outs[0]] == [0, 1, 2, 3]
    assert outs[0] == outs[1]  # same seed, same samples
    assert len({tuple(o["token_ids"]) for o in outs[0]}) > 1  # samples differ from each other


@pytest.mark.parametrize("lines,extra,match", [
    ([{"prompt": "hello"}], [], "no tokenizer files"),
    ([{"foo": 1}], [], "neither 'prompt' nor 'prompt_token_ids'"),
    ([{"prompt_token_ids": [1, 2]}], ["--mode", "sd"], "--mode sd needs --drafter"),
    ([{"prompt_token_ids": [1, 2]}], ["--temperature", "-1"], "temperature must be finite and >= 0, got -1.0"),
    ([{"prompt_token_ids": "abc"}], [], "prompt_token_ids must be a list of ints"),
])
def test_generate_user_errors_exit_2(ckpts, tmp_path, lines, extra, match):
    target, _ = ckpts
    prompts = write_prompts(tmp_path / "p.jsonl", lines)
    res = CliRunner().invoke(main, ["generate", "--model", str(target), "--prompts", str(prompts), "--out",
                                    str(tmp_path / "o.jsonl"), *extra])
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output


def test_generate_invalid_prompt_among_valid_ones(ckpts, tmp_path):
    target, _ = ckpts
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 5]}, {"prompt_token_ids": []},
                                                   {"prompt_token_ids": [1, 7]}])
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(main, ["generate", "--model", str(target), "--prompts", str(prompts), "--out", str(out),
                                    "--max-tokens", "5"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[1]["finish_reason"] == "error"
    assert lines[0]["finish_reason"] in ("stop", "length") and lines[2]["finish_reason"] in ("stop", "length")
    assert lines[0]["token_ids"] and lines[2]["token_ids"]
    assert "empty prompt" in lines[1]["error"]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "nope"), "--prompts", "x", "--out", "y"])
    assert res.exit_code == 2 and "is not a directory" in res.output
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
