"""The tiny models and runs the tests share: one configuration, one training recipe, one text."""

from jaxattn.lm.train import TrainConfig
from jaxattn.nn import TransformerConfig

TINY = TransformerConfig(vocab_size=256, width=16, layers=1, heads=2, kv_heads=1, head_dim=8, mlp_hidden=32, max_length=64)
TINY_TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=2, eval_every=3,
                         eval_windows=2, checkpoint_every=2, keep_checkpoints=2)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
QUIET = dict(progress=False, say=lambda *_: None)
