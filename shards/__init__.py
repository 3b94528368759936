"""The on-disk shard format (writer, index, manifest, verify) and the loaders that read it."""
