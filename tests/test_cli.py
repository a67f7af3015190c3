"""The jaxattn command: clear errors for bad input, a clean Ctrl-C, its outputs."""

import pytest

import jaxattn.lm.train as train_module
from jaxattn.cli import main
from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.data import batch_at

TINY_ARGS = ["--layers", "1", "--width", "16", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
             "--eval-every", "2", "--checkpoint-every", "2"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The next day is bright and the sky is clear. " * 20, encoding="utf-8")
    return path


def test_train_then_generate(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), *TINY_ARGS]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and (out / "loss.png").stat().st_size > 1000
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The sky", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The sky")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1e-3"])
def test_non_finite_or_non_positive_learning_rate_is_a_clear_error(tmp_path, text_file, capsys, value):
    code = main(["train", "--data", str(text_file), "--out", str(tmp_path / "run"), f"--learning-rate={value}", *TINY_ARGS])
    assert code == 2
    assert "error: learning_rate must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_data_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "notes-latin1.txt"
    path.write_bytes("naïve café ".encode("latin-1") * 50)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY_ARGS]) == 2
    assert "notes-latin1.txt' is not UTF-8 text" in capsys.readouterr().err


def test_ctrl_c_saves_and_says_how_to_continue_without_a_traceback(tmp_path, text_file, capsys, monkeypatch):
    def interrupting_batch_at(tokens, step, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        return batch_at(tokens, step, **kwargs)

    monkeypatch.setattr(train_module, "batch_at", interrupting_batch_at)
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), *TINY_ARGS]) == 130
    captured = capsys.readouterr()
    assert "checkpoint saved" in captured.out and "Continue with --resume" in captured.out
    assert "Traceback" not in captured.err
    assert RunFolder(out).latest_step() == 3
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert RunFolder(out).latest_step() == 4


def test_a_second_trainer_is_told_who_holds_the_folder(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), *TINY_ARGS]) == 0
    with RunFolder(out).lock():  # another trainer holds it (flock: another open file, same effect)
        assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "is in use: process" in capsys.readouterr().err


def test_tour_reports_missing_checkpoint_and_bad_text(tmp_path, capsys):
    assert main(["tour", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["tour", "--text", "   ", "--out", str(tmp_path)]) == 2
    assert "at least one word" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import jaxattn.cli as cli
    from jaxattn.lm.hf import LoadError

    def user_error(args):
        raise LoadError("checkpoint 'x' is missing config.json")

    monkeypatch.setattr(cli, "_generate", user_error)
    assert main(["generate"]) == 2
    assert capsys.readouterr().err == "jaxattn generate: error: checkpoint 'x' is missing config.json\n"

    def bug(args):
        return None + 1  # a TypeError: a bug, not something the user typed

    monkeypatch.setattr(cli, "_generate", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["generate"])


def test_an_int8_cache_without_a_cache_is_a_clear_error(capsys):
    assert main(["generate", "--kv-cache", "int8", "--no-cache"]) == 2
    assert "--kv-cache int8 says how to store the cache, and --no-cache decodes without one" in capsys.readouterr().err


def test_train_a_model_with_todays_attention_from_a_config_file(tmp_path, text_file, capsys):
    import json

    config = dict(layers=3, layer_types=["local", "global", "local"], window=4, local_rope_theta=100.0, nope_layers=[2],
                  rotary_fraction=0.5, qk_norm="head", attention_softcap=20.0, final_softcap=15.0, attention_sinks=True,
                  rope_scaling={"kind": "llama3", "factor": 4.0, "original_max_length": 8}, norm_placement="sandwich")
    path = tmp_path / "today.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    args = [arg for arg in TINY_ARGS if arg not in ("--layers", "1")]
    assert main(["train", "--data", str(text_file), "--out", str(out), "--model-config", str(path), *args]) == 0
    model = RunFolder(out).load_model()  # run.json round trip: lists, the scaling's dict
    assert model.config.layer_types == ("local", "global", "local") and model.config.rope_scaling.kind == "llama3"
    assert model.blocks[1].attn.sinks.shape == (4,) and model.blocks[2].attn.settings.rope is None
    capsys.readouterr()
    outputs = []
    for cache in ([], ["--no-cache"]):
        assert main(["generate", "--checkpoint", str(out), "--prompt", "The sky", "--max-new-tokens", "12",
                     "--temperature", "0", *cache]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # cached greedy decoding = recomputing everything
    path.write_text(json.dumps({"qk_norms": "head"}))
    assert main(["train", "--data", str(text_file), "--out", str(tmp_path / "bad"), "--model-config", str(path)]) == 2
    assert "unknown: ['qk_norms']" in capsys.readouterr().err
