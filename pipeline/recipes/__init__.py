"""Generation recipes: pure prompt building and response parsing for `sift generate --generate.recipe ...`."""
