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
    say(f"Its data ({saved['data']}): stretches of 8 to 30 random printable bytes, each written twice, and")
    say("pairs written over and over (a b a b a b). Nothing can be predicted except a repeat; the")
    say("pairs reward a previous-token head on their own, as the bigrams of text do. Without them")
    say("(measured: 10,000 steps at context 64, and 20,000 with learned positions) the model sat on the")
    say("next-best answer, 'some byte seen before', and its first layer learned to look away from")
    say("the previous token; byte text alone gives the heads spelling and grammar to learn first.")
    measured = history["measured"]
    losses = np.asarray(measured["repeated_half_loss"])
    random_loss = float(np.log(94))  # uniform over the printable bytes the test draws
    drop = next((step for step, loss in zip(measured["step"], losses) if loss < random_loss / 2), None)
    say(f"Measured during that run every {train['eval_every']} steps, on random bytes written twice: the loss on the")
    say(f"repeated half starts at {losses[0]:.2f} nats (guessing among 94 bytes: {random_loss:.2f}), stays near it, then")
    if drop is not None:
        say(f"falls within a few hundred steps (below half of it at step {drop:,}) to {losses[-1]:.2f}: the phase change")
        say("Olsson et al. saw in every model they trained.")
    else:
        say(f"ends at {losses[-1]:.2f}: this run stopped before its phase change.")
    show(say, viz.induction_figure(history, out / "induction.png", random_loss=random_loss),
         "the loss on the repeated half and the best induction score against the training step")
    circuit = induction_circuit(model, tokenizer, seed=seed)
    (cl, ch), (rl, rh) = circuit.copying, circuit.reads
    say("Which heads do it? Zeroing each head in turn (its slice of the output projection) and measuring")
    say("the loss on the repeat again, now, on this machine:")
    for line in describe_circuit(circuit):
        say("  " + line)
    if circuit.offset != 1:
        say(f"So the copying head is not the textbook one: it looks {circuit.offset} tokens past the earlier occurrence")
        say("(induction score, which counts the weight on the token right after it, "
            f"{circuit.scores[cl, ch]:.2f}) and reads there what the previous-token")
        say("head wrote: the token that followed the earlier occurrence. The same copy, one step removed;")
        say("each of the three seeds trained for the docs (Look inside a model) found this wiring.")
    _, _, untrained = induction_test(TransformerLM(config, rngs=nnx.Rngs(seed)), tokenizer, seed=seed)
    tokens, weights, scores_now = induction_test(model, tokenizer, seed=seed)
    labels = [tokenizer.label(int(t)) for t in tokens[0]]
    page = write_explorer(out / "induction_explorer.html", np.asarray(weights[:, 0]), labels,
                          title="The induction run on random bytes written twice",
                          description=f"jaxattn train --preset induction: {config.layers} layers x {config.heads} heads",
                          induction=scores_now)
    say.link(page.name, "Explore the induction run's heads on random bytes written twice (click a token of the repeat)")
    return {"circuit": circuit, "untrained": untrained, "history": measured, "explorer": page, "drop_step": drop}
