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


QWEN3 = "tests/data/hf/qwen3"  # a checkpoint with a chat template and a generation config


def test_generate_streams_and_cuts_at_a_stop_string(capsys):
    assert main(["generate", "--model", QWEN3, "--prompt", "The next day is", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    whole = capsys.readouterr().out
    reply = whole[len("The next day is"):-1]
    stop = reply[4:6]
    assert main(["generate", "--model", QWEN3, "--prompt", "The next day is", "--temperature", "0",
                 "--max-new-tokens", "12", "--stop", stop, "--stop", "never there"]) == 0
    assert capsys.readouterr().out == "The next day is" + reply[: reply.find(stop)] + "\n"


def test_chat_without_a_message_is_a_conversation_in_the_terminal(monkeypatch, capsys):
    from jaxattn.lm.generate import Sampling, Stopping, generate
    from jaxattn.lm.load import load_any

    turns = iter(["Hi", "", "Yo"])

    def typed(prompt=""):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    assert main(["generate", "--model", QWEN3, "--chat", "--system", "Be", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0  # the fixture's context is 64 tokens
    printed = capsys.readouterr().out.split("\n")
    model, tokenizer, _ = load_any(QWEN3)
    stopping, messages = Stopping.for_tokenizer(tokenizer), [{"role": "system", "content": "Be"}]
    for number, line in enumerate(["Hi", "Yo"]):  # each turn sees the whole history
        messages.append({"role": "user", "content": line})
        tokens = generate(model, [tokenizer.encode_chat(messages)], max_new_tokens=4, sampling=Sampling(0.0),
                          stopping=stopping)
        reply = tokenizer.decode(tokens[0, : stopping.lengths(tokens)[0]], skip_special_tokens=True)
        assert printed[number] == reply
        messages.append({"role": "assistant", "content": reply})


def test_generate_checks_its_flags_before_loading_and_reads_the_generation_config(tmp_path, capsys):
    import json
    import shutil

    from jaxattn.cli import _generation_settings, build_parser
    from jaxattn.lm.load import checkpoint_dtype

    assert main(["generate", "--model", "/no/such/model", "--top-p", "2"]) == 2
    assert "top_p must be" in capsys.readouterr().err  # not a complaint about the model
    assert main(["generate", "--model", "/no/such/model", "--stop", ""]) == 2
    folder = tmp_path / "model"
    shutil.copytree(QWEN3, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20,
                                                                "top_p": 0.9, "max_new_tokens": 7}))
    settings = lambda *flags: _generation_settings(build_parser().parse_args(["generate", "--model", str(folder), *flags]))  # noqa: E731
    sampling, limit = settings()
    assert (sampling.temperature, sampling.top_k, sampling.top_p, limit) == (0.6, 20, 0.9, 7)
    sampling, limit = settings("--temperature", "0", "--max-new-tokens", "3")
    assert (sampling.temperature, sampling.top_k, sampling.top_p, limit) == (0.0, None, 0.95, 3)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))  # no do_sample: greedy
    assert settings()[0].temperature == 0.0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(folder) == "bfloat16" and checkpoint_dtype(tmp_path) == "float32"
