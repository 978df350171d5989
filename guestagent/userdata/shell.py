"""The ``#!/bin/sh`` form of a cloud-config document made from a template.

The script makes the same changes as our applier does for the ``#cloud-config`` form:
same file contents, atomic replacement with a copy of the replaced file under
``/var/lib/guestagent/userdata/backup``, ``visudo -cf``
before a sudo rule lands, ``authorized_keys`` 0600 owned by its user. Every value was
validated on the way in and is single-quoted on the way out. ``GUESTAGENT_ROOT`` (set by
``guestagent userdata apply --root``) points it at an image tree instead of ``/``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from guestagent.userdata.errors import UserdataError
from guestagent.userdata.handlers import accounts, dns, ntp, repos

SUPPORTED = {
    "manage_resolv_conf",
    "resolv_conf",
    "ntp",
    "yum_repos",
    "apt",
    "groups",
    "users",
    "disable_root",
    "ssh_pwauth",
}

PRELUDE = r"""set -eu
umask 022
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
R="${GUESTAGENT_ROOT:-}"
R="${R%/}"

# put FILE MODE: stdin becomes $R/FILE atomically; the replaced file is kept under the
# agent's state directory (never beside it in /etc)
put() {
  dst="$R$1"
  mkdir -p "$(dirname "$dst")"
  tmp=$(mktemp "$(dirname "$dst")/.guestagent.XXXXXX")
  cat >"$tmp"
  chmod "$2" "$tmp"
  if [ -f "$dst" ] && [ ! -L "$dst" ] && cmp -s "$tmp" "$dst"; then rm -f "$tmp"; return 0; fi
  if [ -e "$dst" ] || [ -L "$dst" ]; then
    bak="$R/var/lib/guestagent/userdata/backup$1"
    mkdir -p -m 0700 "$R/var/lib/guestagent/userdata/backup"
    mkdir -p "$(dirname "$bak")"; rm -f "$bak"; cp -P -p "$dst" "$bak"
  fi
  mv -f "$tmp" "$dst"
}
"""

NTP_FUNC = r"""
# ntp_conf FILE LINE...: comment out other time sources, put ours in a marked block
ntp_conf() {
  f="$1"; shift
  {
    if [ -f "$R$f" ]; then
      awk -v b='# BEGIN guestagent ntp' -v e='# END guestagent ntp' '
        $0 == b { skip = 1; next }
        $0 == e { skip = 0; next }
        skip { next }
        /^[ \t]*(server|pool|peer|sourcedir)[ \t]/ { print "#guestagent# " $0; next }
        { print }' "$R$f"
    fi
    echo '# BEGIN guestagent ntp'
    printf '%s\n' "$@"
    echo '# END guestagent ntp'
  } | put "$f" 0644
}
"""

ACCOUNT_FUNCS = r"""
# acct TOOL ARGS...: run an account tool on $R
acct() {
  if [ -n "$R" ]; then t="$1"; shift; "$t" --root "$R" "$@"; else "$@"; fi
}
has_entry() { grep -q "^$1:" "$R$2" 2>/dev/null; }
# not_system USER: refuse an existing account outside UID 1000..60000 (root, daemons, nobody)
not_system() {
  [ -f "$R/etc/passwd" ] || return 0
  if awk -F: -v u="$1" '$1 == u && ($3 < 1000 || $3 > 60000) { f = 1 } END { exit !f }' \
      "$R/etc/passwd"; then
    echo "guestagent: $1 is a system account; refused" >&2; exit 1
  fi
}
ensure_group() { has_entry "$1" /etc/group || acct groupadd "$1"; }
in_group() {
  awk -F: -v g="$1" -v u="$2" '
    $1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) f = 1 }
    END { exit !f }' "$R/etc/group"
}
unlocked() {
  awk -F: -v u="$1" '$1 == u && $2 !~ /^[!*]/ { f = 1 } END { exit !f }' "$R/etc/shadow" 2>/dev/null
}
# add_keys USER KEY...: append keys not yet present to USER's authorized_keys (0600, owned by USER)
add_keys() {
  u="$1"; shift
  ent=$(awk -F: -v u="$u" '$1 == u { print $3 ":" $4 ":" $6 }' "$R/etc/passwd")
  [ -n "$ent" ] || { echo "guestagent: no user $u" >&2; exit 1; }
  uid=${ent%%:*}; rest=${ent#*:}; gid=${rest%%:*}; home=${rest#*:}
  mkdir -p "$R$home/.ssh"; chmod 700 "$R$home/.ssh"; chown "$uid:$gid" "$R$home/.ssh"
  f="$home/.ssh/authorized_keys"
  {
    if [ -f "$R$f" ]; then grep -v '^[[:space:]]*$' "$R$f" || true; fi
    for k in "$@"; do
      id=$(printf '%s\n' "$k" | awk '{ print $1 " " $2 }')
      if [ -f "$R$f" ] && grep -qF "$id" "$R$f"; then continue; fi
      printf '%s\n' "$k"
    done
  } | put "$f" 0600
  chown "$uid:$gid" "$R$f"
}
# sudo_rules LINE...: check with visudo, then install as /etc/sudoers.d/90-guestagent-users
sudo_rules() {
  t=$(mktemp)
  trap 'rm -f "$t"' EXIT
  if ! grep -Eq '^[#@]includedir[[:space:]]+/etc/sudoers.d' "$R/etc/sudoers" 2>/dev/null; then
    { if [ -f "$R/etc/sudoers" ]; then cat "$R/etc/sudoers"; fi
      echo '#includedir /etc/sudoers.d'; } >"$t"
    visudo -c -q -f "$t" || { echo "guestagent: visudo refused /etc/sudoers" >&2; exit 1; }
    put /etc/sudoers 0440 <"$t"
  fi
  [ -d "$R/etc/sudoers.d" ] || { mkdir -p "$R/etc/sudoers.d"; chmod 755 "$R/etc/sudoers.d"; }
  printf '%s\n' "$@" >"$t"
  visudo -c -q -f "$t" || { echo "guestagent: visudo refused the sudo rules" >&2; exit 1; }
  put /etc/sudoers.d/90-guestagent-users 0440 <"$t"
  rm -f "$t"
}
# sshd_set KEY VALUE...: where sshd_config includes sshd_config.d/*.conf, a drop-in that
# sorts first (sshd keeps the first value it reads); else set them before any Match block
sshd_set() {
  f=/etc/ssh/sshd_config
  if [ -f "$R$f" ] && awk '
      $1 ~ /^#/ { next }
      tolower($1) == "match" { exit 1 }
      tolower($1) == "include" { for (i = 2; i <= NF; i++)
        if ($i ~ /^(\/etc\/ssh\/)?sshd_config\.d\//) { found = 1; exit 0 } }
      END { exit !found }' "$R$f"; then
    { echo '# Generated by guestagent from user-data (disable_root, ssh_pwauth).'
      while [ $# -gt 1 ]; do echo "$1 $2"; shift 2; done
    } | put /etc/ssh/sshd_config.d/01-guestagent.conf 0644
    return 0
  fi
  { if [ -f "$R$f" ]; then cat "$R$f"; fi; } | awk -v kv="$*" '
    BEGIN {
      n = split(kv, a, " ")
      for (i = 1; i < n; i += 2) { l = tolower(a[i]); k[l] = a[i]; v[l] = a[i + 1]; o[++m] = l }
    }
    function flush(j) {
      for (j = 1; j <= m; j++) if (o[j] in k) { print k[o[j]] " " v[o[j]]; delete k[o[j]] }
    }
    { w = ($1 ~ /^#/) ? "" : tolower($1) }
    w == "match" && !inm { inm = 1; flush() }
    !inm && (w in k) { print k[w] " " v[w]; delete k[w]; next }
    { print }
    END { flush() }' | put "$f" 0644
}
"""


def q(value: str) -> str:
    return shlex.quote(value)


def _lines(text: str) -> str:
    return " ".join(q(line) for line in text.rstrip("\n").split("\n"))


def render(doc: Mapping[str, Any], title: str = "") -> str:
    extra = set(doc) - SUPPORTED
    if extra:
        raise UserdataError(f"shell form: cannot render {', '.join(sorted(extra))}")
    body: list[str] = []
    funcs: list[str] = []
    dns_plan = dns.plan_from(doc)
    if dns_plan:
        body += [
            "",
            "# DNS",
            f"printf '%s\\n' {_lines(dns.render(dns_plan))} | put {dns.PATH} 0644",
        ]
    ntp_plan = ntp.plan_from(doc)
    if ntp_plan:
        funcs.append(NTP_FUNC)
        body += ["", "# NTP", *_ntp(ntp_plan)]
    repo_plan = repos.plan_from(doc)
    if repo_plan:
        body += ["", "# Package repositories", *_repos(repo_plan)]
    acct_plan = accounts.plan_from(doc)
    if acct_plan:
        funcs.append(ACCOUNT_FUNCS)
        body += ["", "# Accounts", *_accounts(acct_plan)]
    head = ["#!/bin/sh", f"# guestagent user-data{': ' + title if title else ''}"]
    return "\n".join([*head, PRELUDE.rstrip("\n"), *(f.rstrip("\n") for f in funcs), *body]) + "\n"


def _ntp(plan: ntp.NtpPlan) -> list[str]:
    return [
        f"client={q(plan.client)}",
        'if [ "$client" = auto ]; then',
        '  if [ -e "$R/etc/chrony" ] || [ -e "$R/etc/chrony.conf" ] ||',
        '     [ -e "$R/usr/sbin/chronyd" ]; then client=chrony',
        '  elif [ -e "$R/etc/ntpsec" ] || [ -e "$R/etc/ntp.conf" ] ||',
        '     [ -e "$R/usr/sbin/ntpd" ]; then client=ntp',
        "  else client=chrony; fi",
        "fi",
        'if [ "$client" = chrony ]; then',
        "  conf=/etc/chrony.conf",
        '  if [ -e "$R/etc/chrony" ]; then conf=/etc/chrony/chrony.conf; fi',
        '  units="chrony chronyd"',
        "else",
        '  if [ -e "$R/etc/ntpsec" ]; then conf=/etc/ntpsec/ntp.conf; else conf=/etc/ntp.conf; fi',
        '  units="ntpsec ntp ntpd"',
        "fi",
        'ntp_conf "$conf" ' + " ".join(q(line) for line in plan.lines()),
        'if [ -z "$R" ]; then',
        '  for u in $units; do systemctl try-restart "$u.service" 2>/dev/null || true; done',
        "fi",
    ]


def _repos(plan: repos.ReposPlan) -> list[str]:
    out: list[str] = []
    for repo in plan.yum:
        out.append(
            f"printf '%s\\n' {_lines(repos.render_yum(repo))} "
            f"| put /etc/yum.repos.d/{repo.repo_id}.repo 0644"
        )
    if any("$RELEASE" in s.line for s in plan.apt):
        out += [
            'osr="$R/etc/os-release"; [ -e "$osr" ] || osr="$R/usr/lib/os-release"',
            "RELEASE=$(sed -n 's/^VERSION_CODENAME=//p' \"$osr\" 2>/dev/null \\",
            "  | tr -d '\"' | head -n 1)",
            'if [ -z "$RELEASE" ]; then',
            "  echo 'guestagent: apt source uses $RELEASE;' \\",
            "    'no VERSION_CODENAME in /etc/os-release' >&2",
            "  exit 1",
            "fi",
        ]
    for src in plan.apt:
        line = '"$RELEASE"'.join(q(p) for p in src.line.split("$RELEASE"))
        out.append(
            f"printf '%s\\n' {q(repos.HEADER)} {line} "
            f"| put /etc/apt/sources.list.d/{src.filename} 0644"
        )
    return out


def _accounts(plan: accounts.AccountsPlan) -> list[str]:
    out: list[str] = [f"not_system {q(u.name)}" for u in plan.users]
    out += [f"not_system {q(m)}" for _, members in plan.groups for m in members]
    out += [f"ensure_group {q(name)}" for name, _ in plan.groups]
    for user in plan.users:
        out += [f"ensure_group {q(g)}" for g in user.groups]
        if user.primary_group:
            out.append(f"ensure_group {q(user.primary_group)}")
        add = shlex.join(["acct", *accounts.useradd_argv(user)])
        out += [f"if has_entry {q(user.name)} /etc/passwd; then"]
        out += [
            f"  in_group {q(g)} {q(user.name)} || acct usermod -a -G {q(g)} {q(user.name)}"
            for g in user.groups
        ] or ["  :"]
        out += ["else", f"  {add}", "fi"]
        if user.lock_passwd:
            out.append(f"if unlocked {q(user.name)}; then acct usermod -L {q(user.name)}; fi")
    for name, members in plan.groups:
        for m in members:
            out.append(
                f"if has_entry {q(m)} /etc/passwd && ! in_group {q(name)} {q(m)}; then "
                f"acct usermod -a -G {q(name)} {q(m)}; fi"
            )
    for user in plan.users:
        if user.keys:
            out.append(f"add_keys {q(user.name)} " + " ".join(q(k) for k in user.keys))
    if plan.sudoers():
        out.append(f"sudo_rules {_lines(plan.sudoers())}")
    if plan.sshd():
        out.append("sshd_set " + " ".join(f"{q(k)} {q(v)}" for k, v in plan.sshd()))
    return out
