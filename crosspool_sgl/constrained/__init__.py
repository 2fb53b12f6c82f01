"""Adapters from SGLang's constrained decoding (`sglang.srt.constrained`) to the core's grammar Protocol."""
