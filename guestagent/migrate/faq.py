"""The troubleshooting keywords of the migration guide and what the user should do.

Every failure the user can fix is reported as ``<keyword>: <what happened>`` followed by
an advice line, so a search of the log for the guide's keyword finds it.
"""

from __future__ import annotations

ADVICE: dict[str, str] = {
    "TimeStamp": "the clock of this server disagrees with the cloud's: set the correct "
    "time (enable NTP, e.g. `timedatectl set-ntp true` or `chronyc makestep`) and run again",
    "OperationDenied": "the account that owns access_id has not been approved for the "
    "Cloud Migration Tool: apply for it in the ECS console, then run again",
    "check rsync failed": "rsync is not installed: `apt-get install rsync -y` (Debian, "
    "Ubuntu) or `yum install rsync -y` (CentOS, Red Hat), then run again",
    "check virtio failed": "the virtio drivers (virtio_blk, virtio_net, virtio_pci) must be "
    "in the kernel or its initramfs, or the instance cannot find its disk and network: "
    "install them, rebuild the initramfs (`update-initramfs -u` or `dracut -f`) and run again",
    "check selinux failed": "SELinux must be off: set SELINUX=disabled in "
    "/etc/selinux/config (and reboot, or `setenforce 0`), then run again",
    "GRUB older than 1.9": "the instance may not boot with this boot loader: update GRUB to "
    "1.9 or newer (GRUB 2) before migrating",
    "Do Grub Failed": "the boot loader could not be set up on the target: install GRUB 1.9 "
    "or newer (GRUB 2) on this server and run again",
    "Unknown Error": "check that `platform` in user_config.json names this server's "
    "operating system exactly (the value is case-sensitive)",
    "Permission denied": "rsync could not read these files: add them (or their directory) to "
    "rsync_excludes_linux.txt, or make them readable, and run again",
    "NotEnoughBalance": "the intermediate instance is pay-as-you-go: top up the account or "
    "make sure its payment method has no credit limit, then run again",
    "Forbidden.RAM": "the AccessKey belongs to a RAM user that may not operate ECS "
    "resources: grant it an ECS policy (e.g. AliyunECSFullAccess) and run again",
    "InvalidImageName.Duplicated": "an image named image_name already exists in this "
    "region: choose another image_name in user_config.json and run again",
    "root": "run `guestagent migrate` as root (it must read every file of the server)",
    "free space": "free some space beside user_config.json (client_data and Logs are kept "
    "there) and run again",
    "disk size": "set the disk size in user_config.json larger than the space used on it",
}

# Cloud error codes to the guide's keyword (the code may carry a prefix, e.g.
# InvalidAccountStatus.NotEnoughBalance, InvalidTimeStamp.Expired).
_CODE_KEYWORDS = (
    ("TimeStamp", "TimeStamp"),
    ("OperationDenied", "OperationDenied"),
    ("NotEnoughBalance", "NotEnoughBalance"),
    ("Forbidden.RAM", "Forbidden.RAM"),
    ("InvalidImageName.Duplicated", "InvalidImageName.Duplicated"),
    ("UnknownError", "Unknown Error"),
)


def keyword_for_code(code: str) -> str | None:
    """The guide's keyword for a cloud error code, or None when the guide does not list it."""
    for fragment, keyword in _CODE_KEYWORDS:
        if fragment.lower() in code.lower():
            return keyword
    return None


def advice(keyword: str) -> str:
    return ADVICE.get(keyword, "see the log in Logs/ beside user_config.json")
