// Validates Prometheus Operator resources (ServiceMonitor, PrometheusRule) rendered by the
// chart against the operator's CRD schemas, as packaged by @kubernetes-models/prometheus-operator
// (kubernetes-validate knows only Kubernetes' own kinds). Usage: node validate-crs.mjs FILE.json...
// Exit 1 with the errors of every invalid resource.
import { readFileSync } from "node:fs";
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const kinds = { ServiceMonitor, PrometheusRule };
let failed = 0;
for (const file of process.argv.slice(2)) {
  const doc = JSON.parse(readFileSync(file, "utf8"));
  const Kind = kinds[doc.kind];
  if (!Kind) {
    console.error(`${file}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Kind(doc).validate();
    console.log(`${file}: ${doc.kind} ${doc.metadata.name} valid`);
  } catch (e) {
    console.error(`${file}: ${doc.kind} ${doc.metadata.name} invalid: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
