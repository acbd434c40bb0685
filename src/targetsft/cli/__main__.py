"""``python -m targetsft.cli`` (what ``accelerate launch -m targetsft.cli`` runs on every process)."""

from targetsft.cli.main import console

console()
