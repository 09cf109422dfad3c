"""``python -m facetag`` runs the CLI (also what ``torchrun -m facetag`` starts)."""

from facetag.cli import app

if __name__ == "__main__":
    app()
