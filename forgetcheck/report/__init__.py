"""The HTML report (never torch): the page, its charts and curves, and its templates."""
