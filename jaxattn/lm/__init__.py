"""Everything a language model needs around the network: tokenizer, data, training,
generation and checkpoints."""
