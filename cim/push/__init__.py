"""Push: waking the devices of a user that are not connected (issue #19).

The parts, each in its own module:

    registrations  one registration per (user, device): validated, stored, logged
    presence       the one question "where is device D of user U, app in front or not?"
    texts          what a push says (never a message's text unless [push] show_text)
    decisions      which devices an appended timeline entry pushes, collapsed
    grace          a background device's time to acknowledge an entry before its push
    queue          the node's bounded queue of pushes, with retries
    providers      FCM, APNs and a signed webhook, behind one interface
    frames         PUSH_R on the IM connection; http: /api/v1/devices/me/push
    service        everything above made from [push], started and stopped with the node

docs/push.md says what a push carries, and why each timeline entry is pushed once
per device in a cluster.
"""
