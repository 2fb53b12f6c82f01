"""HTTP entrypoints: native SGLang routes, OpenAI routes, Prometheus metrics."""
