"""Infrastructure every stage shares: errors, parameters, shards, the runner, output folders, guarded readers, the text and record rules."""
