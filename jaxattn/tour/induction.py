"""Step 17: an induction circuit forms while a 2-layer attention-only model trains, shown from
the history of the run ``jaxattn train --preset induction`` wrote, its heads found by ablation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from jaxattn import viz
from jaxattn.tour.page import heading, show


def shipped_induction_run() -> Path:
    """The run the package ships (``jaxattn train --preset induction --seed 0``; its history
    and weights, a few hundred KB): the tour's step 17 shows it without training."""
    return Path(str(resources.files("jaxattn.tour") / "induction-run"))


def step_induction(say, run=None, *, out: Path, seed: int = 0) -> dict:
    """``run``: a run folder of the induction preset (default: ``shipped_induction_run``)."""
    from jaxattn.lm.checkpoint import RunFolder
    from jaxattn.lm.explorer import write_explorer
    from jaxattn.lm.inspection import describe_circuit, induction_circuit, induction_test
    from jaxattn.lm.tokenizer import ByteTokenizer
    from jaxattn.nn import TransformerLM
    from flax import nnx

    heading(say, "Step 17. An induction circuit forms")
    folder = RunFolder(shipped_induction_run() if run is None else run)
    model = folder.load_model()
    saved = folder.read_run()
    history = folder.history()
    tokenizer = ByteTokenizer()
    config = model.config
    say("An induction head completes a pattern seen earlier in the text: having read ... A B ... A,")
    say("it looks back to where A was and predicts B (Elhage et al. 2021; Olsson et al. 2022, arXiv")
    say("2209.11895): in-context learning at its simplest. It takes two layers: a previous-token head")
    say("writes into each position the token before it, and a head of the next layer finds, from the")
    say("current token A, the position whose 'token before' was A, and copies what is there.")
    train = saved["train"]
    say(f"The run shown: jaxattn train --preset induction (seed {train['seed']}): {config.layers} layers of attention")
    say(f"only (no MLP), {config.heads} heads of width {config.head_dim}, {train['steps']:,} steps of {train['batch_size']} "
        f"windows of {train['seq_len']} bytes.")
    say(f"Its data ({saved['data']}): stretches of 8 to 30 random printable bytes, each written twice.")
    say("Nothing in it can be predicted except a repeat. Layer 0 is local with a window of 2: each token")
    say("sees itself and the one before it, so all layer 0 can pass on about the past is the previous")
    say("token, and the textbook circuit is the one way left to copy. With a global layer 0 (and pairs")
    say("a b a b among the repeats) the same model found another wiring: it looked two tokens past the")
    say("earlier occurrence and read there what a previous-token head had written (induction score")
    say("0.01-0.05 in three seeds). On byte text the heads have spelling and grammar to learn first")
    say("(docs: Look inside a model).")
    measured = history["measured"]
    losses = np.asarray(measured["repeated_half_loss"])
    random_loss = float(np.log(94))  # uniform over the printable bytes the test draws
    scores = np.asarray(measured["induction_score"])
    drop = next((step for step, loss in zip(measured["step"], losses) if loss < random_loss / 2), None)
    formed = next((i for i, score in enumerate(scores) if score >= 0.5), None)
    say(f"Measured during that run every {train['eval_every']} steps, on random bytes written twice: the loss on the")
    say(f"repeated half starts at {losses[0]:.2f} nats, is {losses[1]:.2f} by step {measured['step'][1]:,} (guessing among 94 "
        f"bytes: {random_loss:.2f}) and stays there")
    if formed is not None:
        before = measured["step"][max(formed - 1, 0)]
        say(f"while the best induction score stays low ({scores[max(formed - 1, 0)]:.2f} at step {before:,}); then the score jumps")
        say(f"({scores[formed]:.2f} at step {measured['step'][formed]:,}, {scores[-1]:.2f} at the end) and the loss falls with it, to")
        say(f"{losses[-1]:.2f} at step {measured['step'][-1]:,}"
            + (f" (below half of it from step {drop:,})" if drop is not None else "")
            + ": the phase change Olsson et al. saw in every model they trained.")
    else:
        say(f"and ends at {losses[-1]:.2f}, the best induction score at {scores[-1]:.2f}: no induction head formed in this run.")
    show(say, viz.induction_figure(history, out / "induction.png", random_loss=random_loss),
         "the loss on the repeated half and the best induction score against the training step")
    circuit = induction_circuit(model, tokenizer, seed=seed)
    cl, ch = circuit.copying
    say("Which heads do it? Zeroing each head in turn (its slice of the output projection) and measuring")
    say("the loss on the repeat again, now, on this machine:")
    for line in describe_circuit(circuit):
        say("  " + line)
    if circuit.offset != 1:
        say(f"So the copying head is not the textbook one: it looks {circuit.offset} tokens past the earlier occurrence")
        say(f"(its induction score, the weight on the token right after it, is {circuit.scores[cl, ch]:.2f}).")
    _, _, untrained = induction_test(TransformerLM(config, rngs=nnx.Rngs(seed)), tokenizer, seed=seed)
    tokens, weights, scores_now = induction_test(model, tokenizer, seed=seed)
    labels = [tokenizer.label(int(t)) for t in tokens[0]]
    page = write_explorer(out / "induction_explorer.html", np.asarray(weights[:, 0]), labels,
                          title="The induction run on random bytes written twice",
                          description=f"jaxattn train --preset induction: {config.layers} layers x {config.heads} heads",
                          induction=scores_now)
    say.link(page.name, "Explore the induction run's heads on random bytes written twice (click a token of the repeat)")
    return {"circuit": circuit, "untrained": untrained, "history": measured, "explorer": page, "drop_step": drop,
            "formed_step": None if formed is None else measured["step"][formed]}
