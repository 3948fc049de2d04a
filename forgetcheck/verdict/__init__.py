"""The verdict, from JSON only (never torch): compare, rollups, statistics, flips, history, the gate, its
policy and the words of the verdict."""
