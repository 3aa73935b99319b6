{{/*
cadence.name: the chart name, or nameOverride; truncated to the 63 characters a label allows.
*/}}
{{- define "cadence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
cadence.fullname: the prefix of every resource name: fullnameOverride, else `<release>-<name>`
(just `<release>` when it already contains the name). 40 characters leave room for the
longest suffix (`-inference-metrics`) inside the 63-character limit of Service names.
*/}}
{{- define "cadence.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
cadence.component.fullname: the name of one service's objects. Call with (dict "root" $ "component" "inference").
*/}}
{{- define "cadence.component.fullname" -}}
{{- printf "%s-%s" (include "cadence.fullname" .root) .component }}
{{- end }}

{{/*
cadence.chart: `<name>-<version>` for the helm.sh/chart label.
*/}}
{{- define "cadence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
cadence.labels: the full app.kubernetes.io label set of an object. Call with (dict "root" $ "component" "x").
*/}}
{{- define "cadence.labels" -}}
helm.sh/chart: {{ include "cadence.chart" .root }}
{{ include "cadence.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cadence
{{- end }}

{{/*
cadence.selectorLabels: the immutable subset used by selectors: name, instance, component.
*/}}
{{- define "cadence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cadence.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
cadence.metadata: name, namespace and labels of one object. Call with (dict "root" $ "component" "x"
"name" "optional-name-suffix"). The namespace is always explicit.
*/}}
{{- define "cadence.metadata" -}}
name: {{ include "cadence.component.fullname" . }}{{ with .suffix }}-{{ . }}{{ end }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "cadence.labels" . | nindent 2 }}
{{- end }}

{{/*
cadence.serviceAccountName: the ServiceAccount pods run as.
*/}}
{{- define "cadence.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cadence.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false (name an existing ServiceAccount)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
cadence.image: a service image `<repository>-<component>:<tag>[@digest]`, the names `make images` tags
(GPU clusters set the tag `<version>-cuda`, which it gives all four). A digest pins one image, so it is
set per service (`<service>.image.digest`), never shared. Call with
(dict "root" $ "component" "inference" "values" .Values.inference).
*/}}
{{- define "cadence.image" -}}
{{- $global := .root.Values.image }}
{{- $repository := .values.image.repository | default (printf "%s-%s" $global.repository .component) }}
{{- $tag := .values.image.tag | default $global.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}{{ with .values.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/*
cadence.redisUrl: the env entry CADENCE_REDIS_URL: the bundled Redis, an external URL, or a Secret.
*/}}
{{- define "cadence.redisUrlEnv" -}}
- name: CADENCE_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:%d/0" (include "cadence.component.fullname" (dict "root" . "component" "redis")) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.secretKey }}
{{- else }}
  value: {{ required "redis.external.url (or redis.external.existingSecret) is required when redis.enabled is false" .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{/*
cadence.commonEnv: settings every Cadence container shares: logging and writable caches.
*/}}
{{- define "cadence.commonEnv" -}}
- name: CADENCE_LOG_LEVEL
  value: {{ .Values.logging.level | quote }}
- name: CADENCE_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: CADENCE_HOME
  value: /var/cache/cadence
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /var/cache/cadence/hf
- name: XDG_CACHE_HOME
  value: /var/cache/cadence/xdg
{{- end }}

{{/*
cadence.runIdEnv: CADENCE_RUN_ID, the run whose streams a service works on (`cadence k8s submit` patches it).
*/}}
{{- define "cadence.runIdEnv" -}}
- name: CADENCE_RUN_ID
  value: {{ .Values.run.id | quote }}
{{- end }}

{{/*
cadence.streamKey: the Redis key of a run's stream, `cadence:{<run>}:<kind>` (the braces: a Redis Cluster
hash tag). The chart's one copy of `cadence.streams.stream_key`; tests/chart/test_chart.py compares the two.
Call with (dict "run" .Values.run.id "kind" "prompts").
*/}}
{{- define "cadence.streamKey" -}}
{{- printf "cadence:{%s}:%s" .run .kind }}
{{- end }}

{{/*
cadence.brokerAddr: host:port of the broker Service.
*/}}
{{/*
cadence.inferenceRelay: "true" when inference pods relay weight chunks to one another (relay fan-out), else "".
*/}}
{{- define "cadence.inferenceRelay" -}}
{{- $v := .Values.inference }}
{{- if or (eq $v.relay "on") (and (eq $v.relay "auto") (or (gt (int $v.replicas) 1) .Values.keda.enabled)) }}true{{ end }}
{{- end }}

{{- define "cadence.brokerAddr" -}}
{{- printf "%s:%d" (include "cadence.component.fullname" (dict "root" . "component" "broker")) (int .Values.broker.grpcPort) }}
{{- end }}

{{/*
cadence.grpcProbes: native gRPC probes on the standard grpc.health.v1 service every server runs.
startupProbe carries the model-loading budget; liveness and readiness start only after it passes.
Call with (dict "port" 50051 "startup" .Values.inference.startupProbe).
*/}}
{{- define "cadence.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ .startup.periodSeconds | default 5 }}
  failureThreshold: {{ .startup.failureThreshold | default 60 }}
  timeoutSeconds: 5
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/*
cadence.rankZeroProbes: probes for a multi-node trainer. Only global rank 0 (on pod 0) serves gRPC, so
pod 0 checks grpc.health.v1 and the other pods pass while their torchrun lives (torchrun exits, and the
container restarts, when a rank dies). Call with (dict "port" 50054 "startup" .Values.trainer.startupProbe).
*/}}
{{- define "cadence.rankZeroProbes" -}}
{{- $check := list "python" "-c" (printf "import os; from cadence.grpc import wait_healthy; os.environ['CADENCE_NODE_RANK'] != '0' or wait_healthy('127.0.0.1:%d', timeout=4)" (int .port)) }}
startupProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: {{ .startup.periodSeconds | default 5 }}
  failureThreshold: {{ .startup.failureThreshold | default 60 }}
  timeoutSeconds: 8
livenessProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: 30
  timeoutSeconds: 8
  failureThreshold: 3
readinessProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: 15
  timeoutSeconds: 8
  failureThreshold: 3
{{- end }}

{{/*
cadence.resources: a container's resources with `gpus` GPUs added to requests and limits under
gpu.resourceName. Call with (dict "root" $ "values" .Values.inference "name" "inference").
*/}}
{{- define "cadence.resources" -}}
{{- $resources := deepCopy (.values.resources | default dict) }}
{{- $gpus := int (.values.gpus | default 0) }}
{{- if gt $gpus 0 }}
{{- $gpuName := required (printf "gpu.resourceName must name the GPU resource (e.g. nvidia.com/gpu) because %s.gpus is %d" .name $gpus) .root.Values.gpu.resourceName }}
{{- $_ := set $resources "limits" (merge (dict $gpuName $gpus) ($resources.limits | default dict)) }}
{{- $_ := set $resources "requests" (merge (dict $gpuName $gpus) ($resources.requests | default dict)) }}
{{- end }}
{{- if not (and $resources.requests $resources.limits) }}
{{- fail (printf "%s.resources needs both requests and limits (cpu and memory): every Cadence container is sized" .name) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
cadence.podSecurity: the pod-level securityContext and the hardened container securityContext,
as two named values; each template places them. Containers always get .Values.securityContext.
*/}}
{{- define "cadence.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/*
cadence.podCommon: pod spec fields every Cadence pod shares: service account, pull secrets, pod
securityContext, scheduling. Call with (dict "root" $ "values" .Values.inference).
*/}}
{{- define "cadence.podCommon" -}}
serviceAccountName: {{ include "cadence.serviceAccountName" .root }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
cadence.podAnnotations: scrape annotations (when metrics.scrapeAnnotations) plus the service's own.
Call with (dict "root" $ "values" .Values.inference "port" 9090 "path" "/metrics").
*/}}
{{- define "cadence.podAnnotations" -}}
{{- $annotations := dict }}
{{- if .root.Values.metrics.scrapeAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (toString .port) }}
{{- $_ := set $annotations "prometheus.io/path" (.path | default "/metrics") }}
{{- end }}
{{- $annotations = merge $annotations (.values.podAnnotations | default dict) }}
{{- with $annotations }}{{ toYaml . }}{{ end }}
{{- end }}

{{/*
cadence.cacheVolumes: writable paths under a read-only root filesystem: /tmp, the cache
(CADENCE_HOME, HF_HOME) and, when models.existingClaim is set, the read-only model claim.
*/}}
{{- define "cadence.cacheVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "cadence.tmpSizeLimit" . }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- with .Values.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- include "cadence.hfTokenVolume" . }}
{{- end }}

{{/*
cadence.tmpSizeLimit: scratch.tmpSizeLimit, else room for one weight version (updates that miss /dev/shm) + 2 GiB.
*/}}
{{- define "cadence.tmpSizeLimit" -}}
{{- .Values.scratch.tmpSizeLimit | default (include "cadence.gibCeil" (dict "bytes" (include "cadence.versionBytes" .) "extra" 2)) }}
{{- end }}

{{/*
cadence.cacheMounts: the mounts matching cadence.cacheVolumes.
*/}}
{{- define "cadence.cacheMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/cadence
{{- if .Values.models.existingClaim }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- include "cadence.hfTokenMount" . }}
{{- end }}

{{/*
cadence.seedInit: the init container that builds a seed model into the cache (models.seed.enabled),
so a CPU cluster needs no model hub. Call with (dict "root" $ "values" .Values.inference "component"
"inference" "seed" "tiny"); the seed build is deterministic, so every pod builds the same weights.
*/}}
{{- define "cadence.seedInit" -}}
{{- if .root.Values.models.seed.enabled }}
- name: seed-model
  image: {{ include "cadence.image" . }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["cadence", "seed-model", {{ .seed | quote }}]
  env:
    {{- include "cadence.commonEnv" .root | nindent 4 }}
  resources:
    {{- toYaml .root.Values.models.seed.resources | nindent 4 }}
  securityContext:
    {{- include "cadence.containerSecurityContext" .root | nindent 4 }}
  volumeMounts:
    {{- include "cadence.cacheMounts" .root | nindent 4 }}
{{- end }}
{{- end }}

{{/*
cadence.workloadAnnotations: the checkov skips of a Cadence workload, each with its justification
(README.md lists them). Call with (dict "root" $ "redis" true) for workloads that read Redis.
*/}}
{{- define "cadence.workloadAnnotations" -}}
{{ include "cadence.checkovSkip" (dict "n" 1 "check" "CKV_K8S_43" "why" "images are referenced by tag so one values file serves every release; set <service>.image.digest to pin digests") }}
{{- if and .redis (not .root.Values.redis.enabled) .root.Values.redis.external.existingSecret }}
{{ include "cadence.checkovSkip" (dict "n" 2 "check" "CKV_K8S_35" "why" "CADENCE_REDIS_URL is read from the environment (pydantic-settings); the value stays in the referenced Secret, never in the manifest") }}
{{- end }}
{{- end }}

{{/*
cadence.checkovSkip: a checkov.io/skip annotation with its written justification (also listed in
README.md). Call with (dict "n" 1 "check" "CKV_K8S_43" "why" "...").
*/}}
{{- define "cadence.checkovSkip" -}}
checkov.io/skip{{ .n }}: {{ printf "%s=%s" .check .why | quote }}
{{- end }}

{{/*
cadence.versionBytes: bytes of one published weight version: models.parametersBillions × 1e9 ×
models.bytesPerParameter (64 MiB for the tiny seed model, parametersBillions 0). A GPU release must say
how big its model is, so the broker and /tmp are never sized for the toy.
*/}}
{{- define "cadence.versionBytes" -}}
{{- $m := .Values.models }}
{{- $gpus := add (int .Values.inference.gpus) (int .Values.trainer.gpus) }}
{{- if and (gt $gpus 0) (not $m.parametersBillions) (not .Values.broker.maxBytes) }}
{{- fail "models.parametersBillions is required with GPUs (e.g. 8 for Llama-3.1-8B): it sizes the broker's byte budget, memory and volume; or set broker.maxBytes" }}
{{- end }}
{{- if $m.parametersBillions }}
{{- mulf $m.parametersBillions 1e9 $m.bytesPerParameter | ceil | int64 }}
{{- else }}
{{- 67108864 }}
{{- end }}
{{- end }}

{{/*
cadence.brokerMaxBytes: the broker's byte budget: broker.maxBytes, else (retain + 1) versions (the retained
ones plus the publish in flight), at least 1 GiB.
*/}}
{{- define "cadence.brokerMaxBytes" -}}
{{- if .Values.broker.maxBytes }}
{{- int64 .Values.broker.maxBytes }}
{{- else }}
{{- max (mul (add (int .Values.broker.retain) 1) (int64 (include "cadence.versionBytes" .))) 1073741824 }}
{{- end }}
{{- end }}

{{/*
cadence.brokerMemoryBytes: with broker.spill, the most version bytes the broker holds in memory:
broker.spill.memoryBytes, else one version.
*/}}
{{- define "cadence.brokerMemoryBytes" -}}
{{- if .Values.broker.persistence.enabled }}
{{- fail "broker.spill is for the in-memory store: with broker.persistence.enabled every version already lives on the volume; enable one of them" }}
{{- end }}
{{- if .Values.broker.spill.memoryBytes }}
{{- int64 .Values.broker.spill.memoryBytes }}
{{- else }}
{{- include "cadence.versionBytes" . }}
{{- end }}
{{- end }}

{{/*
cadence.brokerSpillSize: the spill volume's size: broker.spill.size, else the byte budget + 25%.
*/}}
{{- define "cadence.brokerSpillSize" -}}
{{- .Values.broker.spill.size | default (include "cadence.gibCeil" (dict "bytes" (div (mul (int64 (include "cadence.brokerMaxBytes" .)) 5) 4))) }}
{{- end }}

{{/*
cadence.gibCeil: a byte count rounded up to whole GiB, as a Kubernetes quantity. Call with (dict "bytes" N "extra" GiB).
*/}}
{{- define "cadence.gibCeil" -}}
{{- printf "%dGi" (add (div (add (int64 .bytes) 1073741823) 1073741824) (int (.extra | default 0))) }}
{{- end }}

{{/*
cadence.brokerResources: broker.resources with memory sized from the budget where not given: the in-memory
store holds every version (budget + 1 GiB), or up to its ceiling when it spills (ceiling + 1 GiB); the
volume store streams chunks (2 GiB).
*/}}
{{- define "cadence.brokerResources" -}}
{{- $v := .Values.broker }}
{{- $held := include "cadence.brokerMaxBytes" . }}
{{- if $v.spill.enabled }}
{{- $held = include "cadence.brokerMemoryBytes" . }}
{{- end }}
{{- $memory := ternary "2Gi" (include "cadence.gibCeil" (dict "bytes" $held "extra" 1)) $v.persistence.enabled }}
{{- $resources := deepCopy ($v.resources | default dict) }}
{{- range $key := list "requests" "limits" }}
{{- with index $resources $key }}
{{- $_ := set $resources $key (merge (deepCopy .) (dict "memory" $memory)) }}
{{- end }}
{{- end }}
{{- include "cadence.resources" (dict "root" . "values" (dict "resources" $resources "gpus" 0) "name" "broker") }}
{{- end }}

{{/*
cadence.hfTokenEnv: with models.hfToken.existingSecret (gated hub models), HF_TOKEN_PATH naming the token
file that cadence.hfTokenVolume/cadence.hfTokenMount put in place: huggingface_hub reads the token from it,
so the secret never sits in the environment (checkov CKV_K8S_35).
*/}}
{{- define "cadence.hfTokenEnv" -}}
{{- if .Values.models.hfToken.existingSecret }}
- name: HF_TOKEN_PATH
  value: /var/run/secrets/cadence/hf/token
{{- end }}
{{- end }}

{{/*
cadence.hfTokenVolume: the Secret volume holding the hub token (key models.hfToken.secretKey → file `token`).
*/}}
{{- define "cadence.hfTokenVolume" -}}
{{- with .Values.models.hfToken.existingSecret }}
- name: hf-token
  secret:
    secretName: {{ . }}
    defaultMode: 0400
    items:
      - key: {{ $.Values.models.hfToken.secretKey }}
        path: token
{{- end }}
{{- end }}

{{/*
cadence.hfTokenMount: the mount matching cadence.hfTokenVolume.
*/}}
{{- define "cadence.hfTokenMount" -}}
{{- if .Values.models.hfToken.existingSecret }}
- name: hf-token
  mountPath: /var/run/secrets/cadence/hf
  readOnly: true
{{- end }}
{{- end }}

{{/*
cadence.modelsWaitInit: with models.download.enabled, an init container that waits for every model's
`.cadence-complete` marker (written by the download Job) on the read-only model claim.
Call with (dict "root" $ "values" .Values.inference "component" "inference").
*/}}
{{- define "cadence.modelsWaitInit" -}}
{{- $m := .root.Values.models }}
{{- if $m.download.enabled }}
{{- $markers := list }}
{{- range $m.download.repos }}
{{- $markers = append $markers (printf "%s/%s/.cadence-complete" $m.mountPath .) }}
{{- end }}
- name: wait-models
  image: {{ include "cadence.image" . }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["python", "-c", "import os, sys, time\nwhile not all(map(os.path.exists, sys.argv[1:])):\n    time.sleep(5)", {{ range $i, $p := $markers }}{{ if $i }}, {{ end }}{{ $p | quote }}{{ end }}]
  resources:
    requests: {cpu: 10m, memory: 64Mi}
    limits: {cpu: 100m, memory: 128Mi}
  securityContext:
    {{- include "cadence.containerSecurityContext" .root | nindent 4 }}
  volumeMounts:
    {{- include "cadence.cacheMounts" .root | nindent 4 }}
{{- end }}
{{- end }}
