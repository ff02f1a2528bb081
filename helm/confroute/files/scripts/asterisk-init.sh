#!/bin/sh
# Init container of a node pod: writes the ARI user of ari.conf with its password from the
# Secret, so the password never sits in a ConfigMap. ';' starts a comment in Asterisk's
# configuration files and is escaped. The file lives in this pod's in-memory volume only, and
# is readable by every user there: Asterisk started as root with `-U asterisk` drops the
# pod's fsGroup with its other supplementary groups, so a group-readable file could not be
# read by it, and ARI would have no user.
set -eu
password=$(printf '%s' "$ARI_PASSWORD" | sed 's/;/\\;/g')
umask 022
out="${ARI_USER_FILE:-/etc/asterisk/confroute/ari-user.conf}"
cat > "$out" <<CONF
[${ARI_USER}]
type = user
read_only = no
password_format = plain
password = ${password}
CONF
