"""Server migration, go2aliyun style: ``guestagent migrate``.

The user runs it as root on the server to move. It reads ``user_config.json``, checks the
server, has the cloud create an intermediate instance (``INSTANCE_FOR_GOTOALIYUN``), sends
the system disk and each data disk to it with rsync over SSH, prepares the received tree
(fstab, boot loader), has an image made from it and releases the instance. Progress is kept
per step in ``client_data`` beside the config, so running it again continues where it
stopped; logs go to ``Logs/`` beside the config.

Modules: ``userconfig`` (the file and its rules), ``prechecks`` (the server's readiness),
``faq`` (the guide's log keywords and what to do), ``signing``/``api`` (the signed ECS RPC
calls), ``state`` (``client_data``), ``transfer`` (rsync), ``steps`` (the run), ``cli``.
"""
