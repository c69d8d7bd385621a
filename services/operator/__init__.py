"""What an operator runs, built on the services: the ``bubuh`` command (``cli.py``), the local process
manager behind ``make up`` (``local_processes.py``), the demo walkthrough of ``make run``
(``walkthrough.py``) and a request's trace (``journey/``). No service imports anything here."""
