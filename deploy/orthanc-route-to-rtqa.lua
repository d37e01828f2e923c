-- Orthanc routing rule: forward every RT plan study object to the rtqa node as it arrives.
-- Orthanc configuration: "DicomModalities": {"rtqa": ["RTQA", "rtqa-host", 11112]},
--                        "LuaScripts": ["orthanc-route-to-rtqa.lua"]
local RT_MODALITIES = { CT = true, RTSTRUCT = true, RTPLAN = true, RTDOSE = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Do not send back what the node itself sent us (its Structured Reports).
  if origin["RequestOrigin"] == "DicomProtocol" and origin["CalledAet"] == "RTQA" then
    return
  end
  if RT_MODALITIES[tags["Modality"]] then
    SendToModality(instanceId, "rtqa")
  end
end
