"""Audio tokenizers: BiCodec (semantic + global codes, and the decoder) and the GLM-4-Voice tokenizer."""
