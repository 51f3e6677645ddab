"""Training loops as plain functions; the Ray Train wiring builds on them."""
