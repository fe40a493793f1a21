"""The push providers, behind one interface (cim.push.notification.PushProvider):
``fcm`` (Firebase Cloud Messaging HTTP v1), ``apns`` (Apple, HTTP/2 with token auth)
and ``webhook`` (a signed JSON POST to the operator's own service). ``answers`` turns
their HTTP answers into outcomes the same way for all three."""
