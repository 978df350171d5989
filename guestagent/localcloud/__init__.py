"""The local cloud: the metadata emulator and the orchestration of real stand-ins for the
other services (S3 servers for OSS, dockerd, the OSS-backed registry, nfs-ganesha, test
hosts in network namespaces, the ECS-style API), so the whole agent runs on one machine.

``guestagent run`` never imports this package; an image build may leave it out.
"""
