"""Step 17: an induction head forms while a 2-layer attention-only model trains, shown from the
history of the run ``jaxattn train --preset induction`` wrote, and proven by ablation."""

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
    from jaxattn.lm.inspection import induction_composition, induction_test
    from jaxattn.lm.tokenizer import ByteTokenizer
    from jaxattn.nn import TransformerLM
    from flax import nnx

    heading(say, "Step 17. An induction head forms")
    folder = RunFolder(shipped_induction_run() if run is None else run)
    model = folder.load_model()
    saved = folder.read_run()
    history = folder.history()
    tokenizer = ByteTokenizer()
    config = model.config
    say("An induction head completes a pattern seen earlier in the text: having read ... A B ... A,")
    say("it looks at the token that followed the earlier A and predicts B (Elhage et al. 2021; Olsson")
    say("et al. 2022, arXiv 2209.11895). It takes two heads in two layers: a previous-token head copies")
    say("each token's predecessor into its position, and the induction head's query (the current token")
    say("A) finds the key that says 'my predecessor was A' -- the position after the earlier A -- and")
    say("copies what is there (K-composition: its keys read the first head's output).")
    train = saved["train"]
    say(f"The run shown here: jaxattn train --preset induction (seed {train['seed']}): {config.layers} layers, attention")
    say(f"only (no MLP), {config.heads} heads of width {config.head_dim}, context {config.max_length}, "
        f"{train['steps']:,} steps of {train['batch_size']}")
    say(f"windows of {train['seq_len']} bytes. Its data ({saved['data']}): stretches of random printable bytes,")
    say("each written more than once. Nothing in them can be predicted except a repeat, and a repeat only")
    say("by looking back, so the induction head is the one way to lower the loss. Byte text trains it too,")
    say("but only after spelling and grammar: not within minutes on a CPU.")
    measured = history["measured"]
    scores, losses = np.asarray(measured["induction_score"]), np.asarray(measured["repeated_half_loss"])
    formed = next((step for step, score in zip(measured["step"], scores) if score >= 0.5), None)
    random_loss = float(np.log(94))  # uniform over the printable bytes the test draws
    say(f"Measured during that run, every {train['eval_every']} steps, on the induction test (random bytes written twice):")
    say(f"  step {measured['step'][0]}: best head {scores[0]:.2f}, loss on the repeated half {losses[0]:.2f} nats "
        f"(guessing: {random_loss:.2f})")
    say(f"  step {measured['step'][-1]}: best head {scores[-1]:.2f}, loss on the repeated half {losses[-1]:.2f} nats")
    if formed is not None:
        say(f"The score first passes 0.5 at step {formed}: the loss on the repeat falls in the same few steps (the")
        say("phase change Olsson et al. saw in every model they trained).")
    show(say, viz.induction_figure(history, out / "induction.png", random_loss=random_loss),
         "the best head's induction score and the loss on the repeated half against the training step")
    try:
        composition = induction_composition(model, tokenizer, seed=seed)
    except ValueError as error:  # a run stopped before the phase change: say so
        composition = None
        say(f"This run has no induction circuit yet: {error}.")
    if composition is not None:
        (layer, head), (p_layer, p_head) = composition.induction, composition.previous
        say(f"Now, on this machine: the best induction head is layer {layer} head {head} (score {composition.score:.2f}).")
        say(f"Zeroing each head of layer {p_layer} in turn (its slice of the output projection) and testing again,")
        say(f"layer {p_layer} head {p_head} is the one it needs: without it the score falls to "
            f"{composition.ablated_score:.2f}. That head puts")
        say(f"{composition.previous_share:.0%} of its weight on the token just before each query: a previous-token head.")
    tokens, weights, scores_now = induction_test(model, tokenizer, seed=seed)
    _, _, untrained = induction_test(TransformerLM(config, rngs=nnx.Rngs(seed)), tokenizer, seed=seed)
    say(f"The same model untrained scores at most {untrained.max():.2f} on any head.")
    labels = [tokenizer.label(int(t)) for t in tokens[0]]
    page = write_explorer(out / "induction_explorer.html", np.asarray(weights[:, 0]), labels,
                          title="The induction run on random bytes written twice",
                          description=f"jaxattn train --preset induction: {config.layers} layers x {config.heads} heads",
                          induction=scores_now)
    say.link(page.name, "Explore the induction run's heads on random bytes written twice (click a token of the repeat)")
    return {"composition": composition, "scores": scores_now, "untrained": untrained, "formed_at": formed,
            "history": measured, "explorer": page}
