"""Webhook delivery on queue ``webhooks`` (docs/webhooks.md): thin tasks over
``shared.services.webhooks``."""

from celery import shared_task

from shared.services import webhooks
from shared.task_names import TaskName

# Retries further out than this wait for the dispatcher (beat) instead of a countdown
# message: the broker redelivers unacknowledged ETA messages after its visibility timeout.
MAX_COUNTDOWN_SECONDS = 3000


@shared_task(name=TaskName.DELIVER_WEBHOOK, bind=True, acks_late=True)
def deliver_webhook(self, delivery_id: str) -> str:
    """One attempt at a delivery; schedules the next one when it stays pending."""
    countdown = webhooks.attempt_delivery(self.app.tollgate, delivery_id)
    if countdown is None:
        return "done"
    if countdown <= MAX_COUNTDOWN_SECONDS:
        self.app.send_task(TaskName.DELIVER_WEBHOOK, args=[delivery_id], countdown=countdown)
    return "retry"


@shared_task(name=TaskName.DISPATCH_WEBHOOKS, bind=True, acks_late=False)
def dispatch_webhooks(self) -> int:
    """Beat: send every pending delivery that is due."""
    return webhooks.dispatch_due(self.app.tollgate, self.app.send_task)
