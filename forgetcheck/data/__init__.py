"""Data: the domain data (`--data`), the packaged med set, replay text and the benchmark builders."""
