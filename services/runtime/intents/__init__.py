"""Gateway intents, shared by capture, refunds and payments (docs/architecture.md, "Calls to the
gateway"): transaction A records an intent with a deterministic idempotency key; a
worker claims it, calls the gateway, and transaction B records the outcome and emits
its event.

* ``store.py`` — ``IntentStore``: an intent table's rows — recorded (transaction A),
  claimed with a lease and a fencing token, resolved with their event (transaction B).
  Due times and leases are judged by the database's clock (``now()``), never a
  worker's: one clock for every host, so a worker whose clock runs ahead cannot take
  over a live claim. Transaction B's event is written by ``outbox.write_event`` with
  the ``Cause`` the row stored (causation = its event id, ``saga_seq`` = its + 1,
  correlation propagated; its ``traceparent`` is the round's span, a child of the
  one the row stored).
* ``worker.py`` — ``IntentWorker``: the rounds (claim → gateway call → resolve), each
  worker naming only its call and its domain's rules; ``LookupIntentWorker`` adds the
  look-up first of the workers that act on an existing payment (capture, refunds).
* ``service.py`` — ``intent_rounds``: a service's worker task (a gateway client and a
  ``WorkLoop`` of worker rounds); ``intent_service`` wires a whole service of them (its
  consumer, whose handlers record intents and NOTIFY, and its ``intent_rounds``).

The retry rules of a round (``RetryPolicy``, ``retry_later``) are pure:
``services.runtime.retry``; waking the workers: ``services.runtime.wakeup``.
"""
