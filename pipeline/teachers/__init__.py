"""Teacher backends: one small protocol, one file per engine, heavy imports inside each."""
