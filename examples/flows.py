"""A job README's "Progress" example runs: ``Task("import", "examples.flows.import_rows", {"rows": 100})``."""

import jobqueue


@jobqueue.job
def import_rows(task):
    """Reads ``rows`` rows, telling how far it got after each; returns how many it read."""
    rows = range(task.get_parameter("rows"))
    for number in rows:
        # ... the real work on one row ...
        if (number + 1) % 10 == 0 or number + 1 == len(rows):
            task.set_progress((number + 1) / len(rows), f"row {number + 1} of {len(rows)}")
    return len(rows)
