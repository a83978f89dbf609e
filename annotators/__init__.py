"""LMM backends behind one interface, the response cache and output cleaning."""
