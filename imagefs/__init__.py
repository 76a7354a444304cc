"""imagefs: one directory per VM image store (file, HTTP, S3, Ceph RBD, Swift), images as files."""
