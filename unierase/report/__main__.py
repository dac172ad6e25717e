"""`python -m unierase.report`: the same as `unierase-table`."""
from unierase.report.cli import main

main()
