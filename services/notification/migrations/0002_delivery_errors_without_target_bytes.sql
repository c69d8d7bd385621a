-- Delivery errors are shown to channels (GET /v1/deliveries). Before issue 10 they quoted the
-- target: up to 200 bytes of its answer after "WEBHOOK_REJECTED: HTTP nnn: ", and exception text
-- (which quotes what the target sent, e.g. an SSH banner) after "WEBHOOK_UNREACHABLE: Type: ".
-- Rows written then keep only the code, the status and the exception's type. Rows in today's
-- wording do not match these patterns, so running this again changes nothing.
UPDATE deliveries
   SET last_error = regexp_replace(last_error, '^(WEBHOOK_REJECTED: HTTP [0-9]{3}): .*$', '\1', 's')
 WHERE last_error ~ '^WEBHOOK_REJECTED: HTTP [0-9]{3}: ';
UPDATE delivery_attempts
   SET error = regexp_replace(error, '^(WEBHOOK_REJECTED: HTTP [0-9]{3}): .*$', '\1', 's')
 WHERE error ~ '^WEBHOOK_REJECTED: HTTP [0-9]{3}: ';
UPDATE deliveries
   SET last_error = regexp_replace(last_error, '^WEBHOOK_UNREACHABLE: ([A-Za-z0-9_.]+): .*$',
                                   'WEBHOOK_UNREACHABLE: the request failed (\1)', 's')
 WHERE last_error ~ '^WEBHOOK_UNREACHABLE: [A-Za-z0-9_.]+: ';
UPDATE delivery_attempts
   SET error = regexp_replace(error, '^WEBHOOK_UNREACHABLE: ([A-Za-z0-9_.]+): .*$',
                              'WEBHOOK_UNREACHABLE: the request failed (\1)', 's')
 WHERE error ~ '^WEBHOOK_UNREACHABLE: [A-Za-z0-9_.]+: ';
UPDATE deliveries SET last_error = 'WEBHOOK_NO_ENDPOINT: channel secret unusable'
 WHERE last_error LIKE 'WEBHOOK_NO_ENDPOINT: channel secret unusable: %';
UPDATE delivery_attempts SET error = 'WEBHOOK_NO_ENDPOINT: channel secret unusable'
 WHERE error LIKE 'WEBHOOK_NO_ENDPOINT: channel secret unusable: %';
