"""Model families' towers; each module defines its config, Linen module, HF table and `Family`."""
