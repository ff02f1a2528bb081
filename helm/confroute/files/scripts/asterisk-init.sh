#!/bin/sh
# Init container of a node pod: writes the ARI user of ari.conf with its password from the
# Secret, so the password never sits in a ConfigMap. The file is readable by the pod's
# fsGroup, which Asterisk's process has. ';' starts a comment in Asterisk's configuration
# files and is escaped.
set -eu
password=$(printf '%s' "$ARI_PASSWORD" | sed 's/;/\\;/g')
umask 027
cat > /etc/asterisk/confroute/ari-user.conf <<CONF
[${ARI_USER}]
type = user
read_only = no
password_format = plain
password = ${password}
CONF
