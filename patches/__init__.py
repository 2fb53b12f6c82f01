"""CPU shims and SGLang hooks.

One module per SGLang (or SGLang dependency) module touched; each names the
version it targets. Nothing here is imported by the core engine.
"""
