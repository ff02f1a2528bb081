{{/* Names, labels, secrets and the TOML writer shared by the templates. */}}

{{- define "confroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "confroute.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's resources; short enough for the Service name limit (63). */}}
{{- define "confroute.component" -}}
{{- printf "%s-%s" (include "confroute.fullname" .root | trunc 45 | trimSuffix "-") .name -}}
{{- end -}}

{{- define "confroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "confroute.labels" -}}
helm.sh/chart: {{ include "confroute.chart" . }}
{{ include "confroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: confroute
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "confroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "confroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of a component: (dict "root" $ "component" "controller"). */}}
{{- define "confroute.componentLabels" -}}
{{ include "confroute.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of a component's pod template: no chart version or appVersion, which would make every
chart upgrade roll the pods, and a StatefulSet roll drains each node for hours.
*/}}
{{- define "confroute.podLabels" -}}
{{ include "confroute.componentSelector" . }}
app.kubernetes.io/part-of: confroute
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "confroute.componentSelector" -}}
{{ include "confroute.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "confroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "confroute.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "confroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The chart's own Secret (values given in values.yaml or generated). */}}
{{- define "confroute.secretName" -}}
{{- include "confroute.fullname" . -}}
{{- end -}}

{{/* secretKeyRef of the API token, or nothing when the API is open. */}}
{{- define "confroute.apiTokenEnv" -}}
{{- if .Values.apiToken.enabled }}
- name: CONFROUTE_HTTP__API_TOKEN
  valueFrom:
    secretKeyRef:
      {{- if .Values.apiToken.existingSecret }}
      name: {{ .Values.apiToken.existingSecret }}
      key: {{ .Values.apiToken.existingSecretKey }}
      {{- else }}
      name: {{ include "confroute.secretName" . }}
      key: api-token
      {{- end }}
{{- end }}
{{- end -}}

{{- define "confroute.redisPasswordSet" -}}
{{- if or .Values.redis.password.value .Values.redis.password.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Redis password for the data nodes (and the sentinels when asked). */}}
{{- define "confroute.redisEnv" -}}
{{- if include "confroute.redisPasswordSet" . }}
{{- $ref := dict "name" (include "confroute.secretName" .) "key" "redis-password" }}
{{- if .Values.redis.password.existingSecret }}
{{- $ref = dict "name" .Values.redis.password.existingSecret "key" .Values.redis.password.existingSecretKey }}
{{- end }}
- name: CONFROUTE_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      {{- toYaml $ref | nindent 6 }}
{{- if and (eq .Values.redis.mode "sentinel") .Values.redis.sentinel.usePassword }}
- name: CONFROUTE_REDIS__SENTINEL__PASSWORD
  valueFrom:
    secretKeyRef:
      {{- toYaml $ref | nindent 6 }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
A checksum of the secret values given in values.yaml that `component`'s pods read, so that
changing one rolls them; empty when none is given: generated values stay the same across
upgrades, and would differ on every `helm template` render.
*/}}
{{- define "confroute.secretChecksum" -}}
{{- $v := .root.Values -}}
{{- $given := list -}}
{{- if and $v.apiToken.enabled (not $v.apiToken.existingSecret) $v.apiToken.value -}}
{{- $given = append $given (print "api-token=" $v.apiToken.value) -}}
{{- end -}}
{{- if and $v.redis.password.value (not $v.redis.password.existingSecret) -}}
{{- $given = append $given (print "redis-password=" $v.redis.password.value) -}}
{{- end -}}
{{- if and (eq .component "node") $v.asterisk.ariPassword.value (not $v.asterisk.ariPassword.existingSecret) -}}
{{- $given = append $given (print "ari-password=" $v.asterisk.ariPassword.value) -}}
{{- end -}}
{{- if $given -}}{{ join "\n" $given | sha256sum }}{{- end -}}
{{- end -}}

{{- define "confroute.ariPasswordRef" -}}
{{- if .Values.asterisk.ariPassword.existingSecret -}}
name: {{ .Values.asterisk.ariPassword.existingSecret }}
key: {{ .Values.asterisk.ariPassword.existingSecretKey }}
{{- else -}}
name: {{ include "confroute.secretName" . }}
key: ari-password
{{- end -}}
{{- end -}}

{{/* The `[redis]` section both binaries share, as a map for the TOML writer. */}}
{{- define "confroute.redisConfig" -}}
{{- $r := .Values.redis -}}
{{- $out := dict "prefix" $r.prefix "timeout" $r.timeout "tls" $r.tls -}}
{{- if $r.username }}{{ $_ := set $out "username" $r.username }}{{ end -}}
{{- if eq $r.mode "url" -}}
{{- if not $r.url }}{{ fail "redis.url is required with redis.mode=url" }}{{ end -}}
{{- $_ := set $out "url" $r.url -}}
{{- else if eq $r.mode "sentinel" -}}
{{- if not $r.sentinel.addresses }}{{ fail "redis.sentinel.addresses is required with redis.mode=sentinel" }}{{ end -}}
{{- /* As the binaries refuse: a redis:// address beside the flag would go out in plaintext on some connections. */ -}}
{{- if $r.sentinel.tls }}{{ range $i, $a := $r.sentinel.addresses }}{{ if hasPrefix "redis://" $a }}{{ fail (printf "redis.sentinel.addresses[%d] is a redis:// URL but redis.sentinel.tls is true: write it as host:port" $i) }}{{ end }}{{ end }}{{ end -}}
{{- $s := dict "master_name" $r.sentinel.masterName "addresses" $r.sentinel.addresses "tls" $r.sentinel.tls -}}
{{- if $r.sentinel.username }}{{ $_ := set $s "username" $r.sentinel.username }}{{ end -}}
{{- $_ := set $out "sentinel" $s -}}
{{- else if eq $r.mode "cluster" -}}
{{- if not $r.cluster.seeds }}{{ fail "redis.cluster.seeds is required with redis.mode=cluster" }}{{ end -}}
{{- range $i, $a := $r.cluster.seeds -}}
{{- if and $r.tls (hasPrefix "redis://" $a) }}{{ fail (printf "redis.cluster.seeds[%d] is a redis:// URL but redis.tls is true: write it as host:port" $i) }}{{ end -}}
{{- if regexMatch "^([a-z]+://)?[^/]*/[1-9][0-9]*$" $a }}{{ fail (printf "redis.cluster.seeds[%d] names a database: a Redis Cluster has database 0 only" $i) }}{{ end -}}
{{- end -}}
{{- $_ := set $out "cluster" (dict "seeds" $r.cluster.seeds) -}}
{{- end -}}
{{- with $r.tlsSecret.name -}}
{{- $tlsInUse := or $r.tls (and (eq $r.mode "url") (hasPrefix "rediss://" $r.url)) (and (eq $r.mode "sentinel") $r.sentinel.tls) -}}
{{- /* A rediss:// seed or sentinel address uses TLS too, as the binaries read it. */ -}}
{{- $addrs := list -}}
{{- if eq $r.mode "cluster" }}{{ $addrs = ($r.cluster).seeds }}{{ else if eq $r.mode "sentinel" }}{{ $addrs = ($r.sentinel).addresses }}{{ end -}}
{{- range $a := $addrs }}{{ if hasPrefix "rediss://" $a }}{{ $tlsInUse = true }}{{ end }}{{ end -}}
{{- if not $tlsInUse }}{{ fail "redis.tlsSecret.name is set but no connection to Redis uses TLS: set redis.tls (or a rediss:// redis.url, or redis.sentinel.tls)" }}{{ end -}}
{{- if not (or $r.tlsSecret.caCertificate $r.tlsSecret.clientCertificate) }}{{ fail "redis.tlsSecret.name is set but neither redis.tlsSecret.caCertificate nor redis.tlsSecret.clientCertificate uses it" }}{{ end -}}
{{- if $r.tlsSecret.caCertificate -}}
{{- $_ := set $out "tls_ca_file" "/etc/confroute/redis-tls/ca.crt" -}}
{{- end -}}
{{- if $r.tlsSecret.clientCertificate -}}
{{- $_ := set $out "tls_cert_file" "/etc/confroute/redis-tls/tls.crt" -}}
{{- $_ := set $out "tls_key_file" "/etc/confroute/redis-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- if kindIs "invalid" $r.waitReplicas -}}
{{- $_ := set $out "wait_replicas" (ternary 1 0 (eq $r.mode "sentinel")) -}}
{{- else -}}
{{- $_ := set $out "wait_replicas" $r.waitReplicas -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
TOML writer: (dict "map" M "path" "a.b"). Scalars and arrays first, then one [table] per
nested map, so the output reads like a hand-written file. Helm's own toToml writes every
number as a float (values are parsed as JSON), which the binaries reject for integer keys;
whole numbers are written as integers here.
*/}}
{{- define "confroute.toml" -}}
{{- $map := .map -}}
{{- $path := .path -}}
{{- range $k := keys $map | sortAlpha -}}
{{- $v := get $map $k -}}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "confroute.tomlKey" $k }} = {{ include "confroute.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $map | sortAlpha -}}
{{- $v := get $map $k -}}
{{- /* An empty profile is a profile (the defaults under its name): its table is written. */ -}}
{{- if and (kindIs "map" $v) (or (not (empty $v)) (eq $path "profiles")) -}}
{{- $sub := include "confroute.tomlKey" $k -}}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- /* A table holding only tables needs no header of its own. */ -}}
{{- $scalars := empty $v -}}
{{- range $e := values $v }}{{ if not (kindIs "map" $e) }}{{ $scalars = true }}{{ end }}{{ end -}}
{{- if $scalars }}

[{{ $sub }}]
{{- end -}}
{{- include "confroute.toml" (dict "map" $v "path" $sub) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "confroute.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "confroute.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq ($v | float64) ($v | int64 | float64) -}}{{ $v | int64 }}{{- else -}}{{ $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i }}, {{ end -}}{{- include "confroute.tomlValue" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "cannot write %v (%s) as TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/*
A duration as humantime 2.4 (the binaries' parser) reads it, in microseconds as a float, with
every unit spelling it knows (a missing one would size grace periods from defaults); empty
when a unit is not known (the binary then names the key itself).
*/}}
{{- define "confroute.durationMicros" -}}
{{- $units := dict "nanos" 0.001 "nsec" 0.001 "ns" 0.001 "usec" 1.0 "us" 1.0 "µs" 1.0 "millis" 1000.0 "msec" 1000.0 "ms" 1000.0 "seconds" 1000000.0 "second" 1000000.0 "secs" 1000000.0 "sec" 1000000.0 "s" 1000000.0 "minutes" 60000000.0 "minute" 60000000.0 "min" 60000000.0 "mins" 60000000.0 "m" 60000000.0 "hours" 3600000000.0 "hour" 3600000000.0 "hr" 3600000000.0 "hrs" 3600000000.0 "h" 3600000000.0 "days" 86400000000.0 "day" 86400000000.0 "d" 86400000000.0 "weeks" 604800000000.0 "week" 604800000000.0 "wk" 604800000000.0 "wks" 604800000000.0 "w" 604800000000.0 "months" 2630016000000.0 "month" 2630016000000.0 "M" 2630016000000.0 "years" 31557600000000.0 "year" 31557600000000.0 "yr" 31557600000000.0 "yrs" 31557600000000.0 "y" 31557600000000.0 -}}
{{- $total := 0.0 -}}
{{- $known := true -}}
{{- range $part := regexFindAll "[0-9]+(\\.[0-9]+)?\\s*[a-zA-Zµ]+" (toString .) -1 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $part | float64 -}}
{{- $unit := regexFind "[a-zA-Zµ]+$" $part -}}
{{- if hasKey $units $unit -}}
{{- $total = addf $total (mulf $num (get $units $unit)) -}}
{{- else -}}
{{- $known = false -}}
{{- end -}}
{{- end -}}
{{- if $known }}{{ $total }}{{ end -}}
{{- end -}}

{{/*
Refuses at render time a duration the binary would refuse at start (the pods would
crash-loop): (dict "key" K "value" V "min" MICROS "max" MICROS-or-0 "limit" TEXT).
*/}}
{{- define "confroute.checkDuration" -}}
{{- if and .value (kindIs "string" .value) -}}
{{- $us := include "confroute.durationMicros" .value -}}
{{- if $us -}}
{{- if lt ($us | float64) (.min | float64) -}}
{{- fail (printf "%s is %q; the binary refuses it: %s" .key .value .limit) -}}
{{- end -}}
{{- if and .max (gt ($us | float64) (.max | float64)) -}}
{{- fail (printf "%s is %q; the binary refuses it: %s" .key .value .limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Durations of both binaries with bounds the schema cannot express. */}}
{{- define "confroute.checkDurations" -}}
{{- $c := .Values.controller.config | default dict -}}
{{- $sip := $c.sip | default dict -}}
{{- $rpc := $c.rpc | default dict -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.sip.tcp_idle_timeout" "value" $sip.tcp_idle_timeout "min" 1000000.0 "max" 0 "limit" "must be at least 1s") -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.rpc.ping_interval" "value" $rpc.ping_interval "min" 1000000.0 "max" 86400000000.0 "limit" "must be between 1s and 24h") -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.rpc.command_timeout" "value" $rpc.command_timeout "min" 100000.0 "max" 86400000000.0 "limit" "must be between 100ms and 24h") -}}
{{- $routing := $c.routing | default dict -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.routing.deadline" "value" $routing.deadline "min" 1.0 "max" 31999999.0 "limit" "must be greater than zero and under 32s (an INVITE transaction's lifetime)") -}}
{{- $http := $c.http | default dict -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.http.header_timeout" "value" $http.header_timeout "min" 1000000.0 "max" 3600000000.0 "limit" "must be between 1s and 1h") -}}
{{- include "confroute.checkDuration" (dict "key" "controller.config.routing.node_refresh" "value" $routing.node_refresh "min" 50000.0 "max" 0 "limit" "must be at least 50ms") -}}
{{- include "confroute.checkDuration" (dict "key" "redis.timeout" "value" .Values.redis.timeout "min" 1.0 "max" 3600000000.0 "limit" "must be greater than zero and at most 1h") -}}
{{- $n := (.Values.node.config | default dict).node | default dict -}}
{{- $ari := (.Values.node.config | default dict).ari | default dict -}}
{{- with $ari.release_after -}}
{{- $us := include "confroute.durationMicros" . -}}
{{- if and $us (gt ($us | float64) 0.0) (lt ($us | float64) 1000000.0) -}}
{{- fail (printf "node.config.ari.release_after is %q; the binary refuses it: must be at least 1s, or 0s for never" .) -}}
{{- end -}}
{{- end -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.request_timeout" "value" $ari.request_timeout "min" 1.0 "max" 3600000000.0 "limit" "must be greater than zero and at most 1h") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.reconnect_min" "value" $ari.reconnect_min "min" 1.0 "max" 3600000000.0 "limit" "must be greater than zero and at most 1h") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.reconnect_max" "value" $ari.reconnect_max "min" 0 "max" 3600000000.0 "limit" "must be at most 1h") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.ping_interval" "value" $ari.ping_interval "min" 1.0 "max" 3600000000.0 "limit" "must be greater than zero and at most 1h") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.reconcile_interval" "value" $ari.reconcile_interval "min" 1.0 "max" 86400000000.0 "limit" "must be greater than zero and at most 24h") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.ari.release_after" "value" $ari.release_after "min" 0 "max" 604800000000.0 "limit" "must be at most 7d") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.node.heartbeat_interval" "value" $n.heartbeat_interval "min" 100000.0 "max" 20000000.0 "limit" "must be between 100ms and 20s, a third of the 60s redis.conference_lease (claims are renewed only by heartbeats, three per lease)") -}}
{{- $webhook := (.Values.node.config | default dict).webhook | default dict -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.webhook.shutdown_wait" "value" $webhook.shutdown_wait "min" 1.0 "max" 600000000.0 "limit" "must be greater than zero and at most 10m") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.webhook.timeout" "value" $webhook.timeout "min" 1.0 "max" 300000000.0 "limit" "must be greater than zero and at most 5m") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.webhook.retry_initial" "value" $webhook.retry_initial "min" 1.0 "max" 3600000000.0 "limit" "must be greater than zero and at most 1h (webhook.retry_max's bound)") -}}
{{- include "confroute.checkDuration" (dict "key" "node.config.webhook.retry_max" "value" $webhook.retry_max "min" 1.0 "max" 3600000000.0 "limit" "must be at most 1h") -}}
{{- end -}}

{{/* The controller's TOML file. */}}
{{- define "confroute.controllerToml" -}}
{{- include "confroute.checkDurations" . -}}
{{- $c := .Values.controller -}}
{{- $cfg := deepCopy ($c.config | default dict) -}}
{{- $any := include "confroute.anyAddr" . -}}
{{- $_ := set $cfg "sip" (merge (dict "listen" (printf "%s:%d" $any (int $c.sipPort))) ($cfg.sip | default dict)) -}}
{{- $_ := set $cfg "http" (merge (dict "listen" (printf "%s:%d" $any (int $c.httpPort))) ($cfg.http | default dict)) -}}
{{- $_ := set $cfg "redis" (include "confroute.redisConfig" . | fromJson) -}}
# confroute-controller settings, written by the confroute chart. The API token and the
# Redis password come from the environment (CONFROUTE_HTTP__API_TOKEN, CONFROUTE_REDIS__PASSWORD).
{{- include "confroute.toml" (dict "map" $cfg "path" "") }}
{{ end -}}

{{/* The node agent's TOML file. Identity and addresses come from the environment. */}}
{{- define "confroute.nodeToml" -}}
{{- include "confroute.checkDurations" . -}}
{{- $n := .Values.node -}}
{{- $cfg := deepCopy ($n.config | default dict) -}}
{{- $node := dict "zone" $n.zone "capacity" $n.capacity "participant_capacity" (int ($n.participantCapacity | default 0)) "drain_deadline" (printf "%ds" (int $n.drainDeadlineSeconds)) -}}
{{- $_ := set $cfg "node" (merge $node ($cfg.node | default dict)) -}}
{{- $_ := set $cfg "http" (dict "listen" (printf "%s:%d" (include "confroute.anyAddr" .) (int $n.httpPort))) -}}
{{- $ari := dict "url" (printf "http://127.0.0.1:%d" (int .Values.asterisk.ariPort)) "username" .Values.asterisk.ariUser "app" .Values.asterisk.ariApp -}}
{{- /* The header the controllers name the conference in, read by the agent when the dialplan passes no name. */ -}}
{{- if not (hasKey ($cfg.ari | default dict) "conference_header") -}}
{{- with (.Values.controller.config.sip | default dict).header_conference }}{{ $_ := set $ari "conference_header" . }}{{ end -}}
{{- end -}}
{{- $_ := set $cfg "ari" (merge $ari ($cfg.ari | default dict)) -}}
{{- $_ := set $cfg "redis" (include "confroute.redisConfig" . | fromJson) -}}
{{- if not $cfg.profiles }}{{ $_ := unset $cfg "profiles" }}{{ end -}}
# confroute-node settings, written by the confroute chart. node.id, node.sip_uri and
# node.control come from the pod (CONFROUTE_NODE__*); the ARI password, the API token and the
# Redis password from Secrets.
{{- include "confroute.toml" (dict "map" $cfg "path" "") }}
{{ end -}}

{{/*
Grace period of a node pod. Kubernetes kills the pod when it ends, preStop drain or not. Past
the drain deadline the agent may still wait up to 30 s for its first reconciliation after a
restart (docs/configuration.md), 10 s for the conferences it ends to tear down and
webhook.shutdown_wait (15 s by default; twice webhook.timeout when that is longer, for the
last bus messages) for their last status callbacks before it deregisters: a grace under the
deadline plus 45 s plus that wait would cut that and leave claims, callbacks and the node
record behind.
*/}}
{{- define "confroute.nodeTerminationGrace" -}}
{{- include "confroute.checkDurations" . -}}
{{- $deadline := int .Values.node.drainDeadlineSeconds -}}
{{- $webhook := (.Values.node.config | default dict).webhook | default dict -}}
{{- $wait := include "confroute.ceilSeconds" (dict "value" $webhook.shutdown_wait "default" 15) | int -}}
{{- /* The last bus messages get twice webhook.timeout beside the callbacks' wait. */ -}}
{{- $flush := mul 2 (include "confroute.ceilSeconds" (dict "value" $webhook.timeout "default" 5) | int) -}}
{{- if gt $flush $wait }}{{ $wait = $flush }}{{ end -}}
{{- if kindIs "invalid" .Values.node.terminationGracePeriodSeconds -}}
{{- add $deadline 285 $wait -}}
{{- else -}}
{{- $grace := int .Values.node.terminationGracePeriodSeconds -}}
{{- $least := add $deadline 45 $wait -}}
{{- if lt $grace $least -}}
{{- fail (printf "node.terminationGracePeriodSeconds (%d) is below node.drainDeadlineSeconds (%d) + 45 s + %d s for the last callbacks and bus messages (node.config.webhook.shutdown_wait, or twice node.config.webhook.timeout when longer): Kubernetes would kill draining nodes before their calls end, their claims are released and their last status callbacks are sent. Set it to at least %d, or null for node.drainDeadlineSeconds + 285 s + that wait" $grace $deadline $wait $least) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/*
Whole seconds a duration setting lasts, rounded up: (dict "value" V "default" SECONDS) for an
unset or unreadable value (the binary refuses the latter at start).
*/}}
{{- define "confroute.ceilSeconds" -}}
{{- $us := "" -}}
{{- if and .value (kindIs "string" .value) -}}
{{- $us = include "confroute.durationMicros" .value -}}
{{- end -}}
{{- if $us -}}
{{- ceil (divf ($us | float64) 1000000.0) | int -}}
{{- else -}}
{{- .default -}}
{{- end -}}
{{- end -}}

{{/*
Least grace period of a controller pod: its preStop sleep, then the HTTP requests in flight
(rpc.command_timeout + routing.deadline + 1 s: a call-control request homes its conference,
then waits for its node), then 2 s for call-control clients to be told, and 1 s to spare.
*/}}
{{- define "confroute.controllerLeastGrace" -}}
{{- /* A duration the binary refuses is named as such first. */ -}}
{{- include "confroute.checkDurations" . -}}
{{- $c := .Values.controller.config | default dict -}}
{{- $command := include "confroute.ceilSeconds" (dict "value" ($c.rpc | default dict).command_timeout "default" 5) | int -}}
{{- $routing := include "confroute.ceilSeconds" (dict "value" ($c.routing | default dict).deadline "default" 1) | int -}}
{{- add (int .Values.controller.preStopSleepSeconds) $command $routing 4 -}}
{{- end -}}

{{/* Pod anti-affinity over hosts: (dict "root" $ "component" "node" "mode" "soft"). */}}
{{- define "confroute.antiAffinity" -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "confroute.componentSelector" . | fromYaml)) -}}
{{- if eq .mode "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - {{- toYaml $term | nindent 6 }}
{{- else if eq .mode "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        {{- toYaml $term | nindent 8 }}
{{- end -}}
{{- end -}}

{{/* Asterisk's configuration files: the chart's, each replaced by asterisk.configFiles when
named there, plus any other file named there. As JSON: {"pjsip.conf": "...", ...}. */}}
{{- define "confroute.asteriskFiles" -}}
{{- $out := dict -}}
{{- range $path, $_ := .Files.Glob "files/asterisk/*.conf" -}}
{{- $_ := set $out (base $path) (tpl ($.Files.Get $path) $) -}}
{{- end -}}
{{- range $name, $content := .Values.asterisk.configFiles -}}
{{- $_ := set $out $name $content -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The Redis TLS Secret (redis.tlsSecret.name), mounted where the [redis] section's
tls_*_file keys point. */}}
{{- define "confroute.redisTlsMount" -}}
{{- if .Values.redis.tlsSecret.name }}
- name: redis-tls
  mountPath: /etc/confroute/redis-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "confroute.redisTlsVolume" -}}
{{- with .Values.redis.tlsSecret.name }}
- name: redis-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{/*
The pod's address as a URI host: an IPv6 address goes in brackets (RFC 3986, RFC 3261), or
the agent refuses its own control URL and the SIP URI is not one.
*/}}
{{- define "confroute.nodeHost" -}}
{{- if eq (.Values.ipFamily | default "IPv4") "IPv6" -}}
[$(NODE_IP)]
{{- else -}}
$(NODE_IP)
{{- end -}}
{{- end -}}

{{/* The wildcard address listeners bind, in the cluster's address family. */}}
{{- define "confroute.anyAddr" -}}
{{- if eq (.Values.ipFamily | default "IPv4") "IPv6" -}}[::]{{- else -}}0.0.0.0{{- end -}}
{{- end -}}
