from twisted.application.service import ServiceMaker

cim = ServiceMaker("cim", "cim.tap", "cim instant-messaging server", "cim")
