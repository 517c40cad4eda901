"""A tiny webhook receiver for the local stack: prints every webhook it gets and
verifies its Standard Webhooks signature when WEBHOOK_SECRET (whsec_...) is set."""
import base64
import hashlib
import hmac
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


def verify(secret, headers, body):
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sent = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if "," in s]
    return any(hmac.compare_digest(expected, s) for s in sent)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        secret = os.environ.get("WEBHOOK_SECRET")
        verdict = "unchecked"
        if secret:
            verdict = "valid" if verify(secret, self.headers, body) else "INVALID"
        print(f"webhook {self.headers.get('webhook-id')} signature {verdict}", flush=True)
        print(json.dumps(json.loads(body), indent=2), flush=True)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "9000"))), Handler).serve_forever()
