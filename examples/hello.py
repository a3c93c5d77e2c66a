"""The job README's first run uses: ``python jobqueue.py worker hello``."""

import jobqueue


class GreetJob(jobqueue.Job):
    """Greets the ``name`` parameter; the greeting is stored as the task's result."""

    def perform(self, task):
        greeting = f"Hello, {task.get_parameter('name')}!"
        self.logger.info(greeting)
        return greeting
