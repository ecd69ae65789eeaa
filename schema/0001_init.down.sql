DROP TABLE IF EXISTS {{.Processed}};
DROP TRIGGER IF EXISTS {{.NotifyTrigger}} ON {{.Events}};
DROP FUNCTION IF EXISTS {{.NotifyFunc}}();
DROP TABLE IF EXISTS {{.Events}};
