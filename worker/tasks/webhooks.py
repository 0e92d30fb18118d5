"""Webhook delivery on queue ``webhooks`` (docs/webhooks.md): thin tasks over
``shared.services.webhooks``."""

from celery import shared_task

from shared.services import webhooks

# Retries further out than this wait for the dispatcher (beat) instead of a countdown
# message: the broker redelivers unacknowledged ETA messages after its visibility timeout.
MAX_COUNTDOWN_SECONDS = 3000


@shared_task(name="tollgate.deliver_webhook", bind=True, acks_late=True)
def deliver_webhook(self, delivery_id: str) -> str:
    """One attempt at a delivery; schedules the next one when it stays pending."""
    countdown = webhooks.attempt_delivery(self.app.tollgate, delivery_id)
    if countdown is None:
        return "done"
    if countdown <= MAX_COUNTDOWN_SECONDS:
        self.app.send_task("tollgate.deliver_webhook", args=[delivery_id], countdown=countdown)
    return "retry"


@shared_task(name="tollgate.dispatch_webhooks", bind=True, acks_late=False)
def dispatch_webhooks(self) -> int:
    """Beat: send every pending delivery that is due."""
    return webhooks.dispatch_due(self.app.tollgate, self.app.send_task)
