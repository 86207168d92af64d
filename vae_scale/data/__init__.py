"""Data: the shard format (written and read), the deterministic resumable loader, the image reader of the
inference commands, synthetic batches."""
